//! `ftvm check-guest PATH [--json]`: the determinism checker on a guest image file
//! (`vmm::image::check`). Exit status 0: no findings; 1: findings (listed); 2: the image cannot
//! be read or is not a loadable image for the guest ABI.

use std::path::PathBuf;

use vmm::image::check::{check_image, Report};

/// `ftvm check-guest`.
#[derive(clap::Args, Debug)]
pub struct CheckGuestArgs {
    /// The guest image: a static x86-64 ELF executable built against the guest ABI.
    pub path: PathBuf,
    /// Print the report as JSON (on stdout) instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// Exit status: no findings.
pub const PASS: i32 = 0;
/// Exit status: findings.
pub const FINDINGS: i32 = 1;
/// Exit status: unreadable or malformed image.
pub const MALFORMED: i32 = 2;

#[derive(serde::Serialize)]
struct JsonReport<'a> {
    image: String,
    sha256: String,
    passes: bool,
    #[serde(flatten)]
    report: &'a Report,
}

#[derive(serde::Serialize)]
struct JsonError {
    image: String,
    error: String,
}

/// Checks the image and prints the result; returns the exit status.
pub fn run(args: &CheckGuestArgs) -> i32 {
    let name = args.path.display().to_string();
    let checked = vmm::image::read_file(&args.path)
        .and_then(|bytes| Ok((check_image(&bytes)?, vmm::migrate::image_digest(&bytes))));
    let (report, digest) = match checked {
        Ok(r) => r,
        Err(e) => {
            if args.json {
                print_json(&JsonError {
                    image: name,
                    error: e.to_string(),
                });
            } else {
                eprintln!("error: {name}: {e}");
            }
            return MALFORMED;
        }
    };
    if args.json {
        print_json(&JsonReport {
            image: name,
            sha256: vmm::migrate::hex(&digest),
            passes: report.passes(),
            report: &report,
        });
    } else if report.passes() {
        println!(
            "{name}: no findings ({} instructions in {} bytes of code{})",
            report.instructions,
            report.code_bytes,
            if report.sti_allowed > 0 {
                format!(
                    "; {} sti allowed: the image loads an IDT",
                    report.sti_allowed
                )
            } else {
                String::new()
            }
        );
    } else {
        for line in report.lines() {
            println!("{line}");
        }
        println!(
            "{name}: {} finding(s): the primary and the backup cannot agree on these \
             instructions",
            report.findings.len()
        );
    }
    if report.passes() {
        PASS
    } else {
        FINDINGS
    }
}

fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: encoding the report: {e}"),
    }
}
