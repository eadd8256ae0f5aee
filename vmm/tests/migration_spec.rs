//! `vmm/MIGRATION.md` says what the code does: its kinds table and header constants are
//! checked against `vmm::migrate::stream`.

use vmm::migrate::stream::{
    Kind, CHUNK_HEADER_LEN, HEADER_LEN, MAGIC, MAX_DEVICE_STATE, MAX_PAGES_PER_CHUNK, MAX_PAYLOAD,
    STREAM_VERSION,
};

const SPEC: &str = include_str!("../MIGRATION.md");

#[test]
fn the_kinds_table_lists_every_kind_with_its_number() {
    let rows: Vec<(u8, String)> = SPEC
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let n = cells.get(1)?.parse::<u8>().ok()?;
            let name = cells.get(2)?;
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                .then(|| (n, name.to_string()))
        })
        .collect();
    let code: Vec<(u8, String)> = Kind::ALL
        .iter()
        .map(|k| (*k as u8, k.name().to_string()))
        .collect();
    assert_eq!(rows, code, "MIGRATION.md's kinds table");
}

#[test]
fn the_constants_match() {
    assert!(SPEC.contains(&format!("magic `{}`", String::from_utf8_lossy(&MAGIC))));
    assert_eq!(CHUNK_HEADER_LEN, 16);
    assert!(SPEC.contains("Every chunk is a 16-byte header"));
    let max = MAX_PAYLOAD.to_string();
    let with_commas = format!("{},{},{}", &max[..1], &max[1..4], &max[4..]);
    assert!(
        SPEC.contains(&format!("at most {with_commas}")),
        "{with_commas}"
    );
    assert!(SPEC.contains(&format!("`u32 count` (1..={MAX_PAGES_PER_CHUNK})")));
    assert!(SPEC.contains(&format!("`u32 version` ({STREAM_VERSION})")));
    assert!(SPEC.contains(&format!("({HEADER_LEN} bytes)")));
    assert!(SPEC.contains("at most 65,536 bytes") && MAX_DEVICE_STATE == 65_536);
}
