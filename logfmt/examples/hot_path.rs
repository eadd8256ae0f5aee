//! Rough hot-path timing of the codec: encode and decode of 64-byte `DeviceInput` entries.
//!
//! Run with `cargo run --release -p logfmt --example hot_path`. This is a sanity check of the
//! order of magnitude, not a benchmark (the bench crate does the real measurements). Each
//! figure is the best of several runs, to keep noise from other processes out.

use std::hint::black_box;
use std::time::Instant;

use logfmt::{Entry, Event, FrameView, FrameWriter, Position};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Runs `f` (which handles `per_run` entries) several times; returns the best ns per entry.
fn best_ns(per_run: u32, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..7 {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_nanos() as f64 / f64::from(per_run));
    }
    Ok(best)
}

fn decode_all(frame: &[u8]) -> Result<()> {
    let (view, _) = FrameView::parse(black_box(frame))?;
    for e in view.entries() {
        black_box(e);
    }
    Ok(())
}

fn main() -> Result<()> {
    let data = [0x5a_u8; 64];
    let entry = Entry::new(
        Position::at_exit(1),
        Event::DeviceInput {
            device: 1,
            data: &data,
        },
    );
    let mut buf = vec![0u8; 1 << 16];
    let encode = |buf: &mut [u8], first_seq: u64, n: u32| -> Result<usize> {
        let mut w = FrameWriter::new(buf, 1, first_seq)?;
        for _ in 0..n {
            w.push(black_box(&entry))?;
        }
        Ok(w.finish()?)
    };

    // One entry per frame: the full cost of shipping a single event.
    let rounds = 200_000u32;
    let both = best_ns(rounds, || {
        for seq in 0..rounds {
            let len = encode(&mut buf, u64::from(seq), 1)?;
            decode_all(&buf[..len])?;
        }
        Ok(())
    })?;
    let enc = best_ns(rounds, || {
        for seq in 0..rounds {
            black_box(encode(&mut buf, u64::from(seq), 1)?);
        }
        Ok(())
    })?;
    let len = encode(&mut buf, 0, 1)?;
    let dec = best_ns(rounds, || {
        for _ in 0..rounds {
            decode_all(&buf[..len])?;
        }
        Ok(())
    })?;
    println!(
        "1-entry frame ({len} bytes): encode {enc:5.1} ns, decode {dec:5.1} ns, both {both:5.1} ns"
    );

    // 64 entries per frame: the batched cost per entry.
    let (batch, frames) = (64u32, 4_000u32);
    let enc = best_ns(batch * frames, || {
        for seq in 0..frames {
            black_box(encode(&mut buf, u64::from(seq * batch), batch)?);
        }
        Ok(())
    })?;
    let len = encode(&mut buf, 0, batch)?;
    let dec = best_ns(batch * frames, || {
        for _ in 0..frames {
            decode_all(&buf[..len])?;
        }
        Ok(())
    })?;
    println!("64-entry frame ({len} bytes): encode {enc:5.1} ns, decode {dec:5.1} ns per entry");
    Ok(())
}
