//! Stress: millions of checksummed records of random sizes between two threads, through rings
//! small enough to wrap tens of thousands of times, with random batch sizes on both ends.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use transport::ring::{self, RingError};
use transport::PollPolicy;

/// Payload layout: u64 index, random bytes, u32 CRC32C over everything before it.
const OVERHEAD: usize = 12;

fn run(capacity: usize, records: u64, max_len: usize, seed: u64) {
    let (mut producer, mut consumer) = ring::heap(capacity).expect("ring");
    let max_len = max_len.min(producer.max_record_len());
    let producer_thread = std::thread::spawn(move || {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut poller = PollPolicy::BALANCED.poller();
        let mut batch = 0;
        let mut i = 0u64;
        while i < records {
            let len = rng.gen_range(OVERHEAD..=max_len);
            match producer.try_reserve(len) {
                Ok(buf) => {
                    buf[..8].copy_from_slice(&i.to_le_bytes());
                    rng.fill(&mut buf[8..len - 4]);
                    let crc = crc32c::crc32c(&buf[..len - 4]);
                    buf[len - 4..].copy_from_slice(&crc.to_le_bytes());
                    i += 1;
                    batch += 1;
                    // Commit in random-sized batches, as the VMM does between exits.
                    if batch >= rng.gen_range(1..32) {
                        producer.commit();
                        batch = 0;
                    }
                    poller.reset();
                }
                Err(RingError::Full { .. }) => {
                    producer.commit();
                    batch = 0;
                    poller.wait();
                }
                Err(e) => panic!("producer: {e}"),
            }
        }
        producer.commit();
    });

    let mut rng = SmallRng::seed_from_u64(seed ^ 0xC0FFEE);
    let mut poller = PollPolicy::BALANCED.poller();
    let mut next = 0u64;
    let mut bytes = 0u64;
    while next < records {
        let max = rng.gen_range(1..100);
        let n = consumer
            .consume(max, |rec| {
                assert!(rec.len() >= OVERHEAD, "record {next} too short");
                let (body, crc) = rec.split_at(rec.len() - 4);
                let index = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                assert_eq!(index, next, "records in order, none lost or repeated");
                let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
                assert_eq!(crc, crc32c::crc32c(body), "checksum of record {next}");
                bytes += rec.len() as u64;
                next += 1;
            })
            .expect("no corruption");
        if n == 0 {
            poller.wait();
        } else {
            poller.reset();
        }
    }
    assert!(!consumer.has_records().expect("ok"), "no extra records");
    producer_thread.join().expect("producer thread");
    let wraps = bytes / capacity as u64;
    eprintln!("{records} records, {bytes} bytes, ~{wraps} wraps of a {capacity}-byte ring");
    assert!(wraps > 1000, "the test must wrap the ring many times");
}

#[test]
fn two_million_small_records_through_a_4k_ring() {
    run(4096, 2_000_000, 128, 1);
}

#[test]
fn one_million_mixed_records_up_to_the_size_limit() {
    run(1 << 14, 1_000_000, usize::MAX, 2);
}
