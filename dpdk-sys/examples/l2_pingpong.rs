//! Raw-Ethernet ping-pong over any DPDK port (memif, af_packet on a veth, ...), one process per
//! side:
//!
//! ```text
//! l2_pingpong echo            -- <EAL args>    # returns every 0x88B5 frame to its sender
//! l2_pingpong ping COUNT SIZE -- <EAL args>    # COUNT round trips of SIZE-byte frames
//! ```
//!
//! e.g. over a veth pair (root):
//!
//! ```text
//! ip link add ftvm0 type veth peer name ftvm1 && ip link set ftvm0 up && ip link set ftvm1 up
//! l2_pingpong echo -- --no-huge -m 256 --no-pci --no-telemetry -l 0 --file-prefix e \
//!     --vdev=net_af_packet0,iface=ftvm0 &
//! l2_pingpong ping 100000 64 -- --no-huge -m 256 --no-pci --no-telemetry -l 1 --file-prefix p \
//!     --vdev=net_af_packet0,iface=ftvm1
//! ```
//!
//! The pinger sends to the broadcast address until it learns the echo side's MAC from the first
//! reply. Frames of other ethertypes (IPv6 neighbour discovery on a veth, ...) are ignored.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use dpdk_sys::{Eal, EtherAddr, Mbuf, Mempool, Port, ETHERTYPE_FTVM, ETHER_HDR_LEN};

const BROADCAST: EtherAddr = EtherAddr([0xff; 6]);

fn frame(
    pool: &Mempool,
    dst: EtherAddr,
    src: EtherAddr,
    seq: u64,
    size: usize,
) -> Result<Mbuf, String> {
    let mut m = pool.alloc().map_err(|e| e.to_string())?;
    let f = m.append(size).map_err(|e| e.to_string())?;
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&ETHERTYPE_FTVM.to_be_bytes());
    f[ETHER_HDR_LEN..ETHER_HDR_LEN + 8].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in f[ETHER_HDR_LEN + 8..].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_add(i as u8);
    }
    Ok(m)
}

fn is_ours(m: &Mbuf) -> bool {
    let d = m.data();
    d.len() >= ETHER_HDR_LEN + 8 && u16::from_be_bytes([d[12], d[13]]) == ETHERTYPE_FTVM
}

fn open(eal_args: &[&str]) -> Result<(Eal, Mempool, Port), String> {
    let eal = Eal::init(eal_args).map_err(|e| e.to_string())?;
    let pool = Mempool::new("pingpong", 4095, 256, Mempool::DEFAULT_DATA_ROOM)
        .map_err(|e| e.to_string())?;
    let ports = eal.ports();
    let &[id] = ports.as_slice() else {
        return Err(format!("expected exactly one port, found {ports:?}"));
    };
    let mut port = Port::configure(id, &pool, 1024, 1024).map_err(|e| e.to_string())?;
    port.set_promiscuous(true).map_err(|e| e.to_string())?;
    port.start().map_err(|e| e.to_string())?;
    let started = Instant::now();
    while !port.link().map_err(|e| e.to_string())?.up {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("link down for 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!(
        "{} port {id} ({}) up, MAC {}",
        std::process::id(),
        port.name(),
        port.mac_address().map_err(|e| e.to_string())?
    );
    Ok((eal, pool, port))
}

fn echo(eal_args: &[&str]) -> Result<(), String> {
    let (_eal, _pool, mut port) = open(eal_args)?;
    let mut rx = Vec::with_capacity(32);
    loop {
        if port.rx_burst(&mut rx) == 0 {
            std::hint::spin_loop();
            continue;
        }
        for mut m in rx.drain(..) {
            if !is_ours(&m) {
                continue;
            }
            let f = m.data_mut();
            if f[ETHER_HDR_LEN..ETHER_HDR_LEN + 8] == u64::MAX.to_le_bytes() {
                return Ok(());
            }
            let (dst, src) = f.split_at_mut(6);
            dst.swap_with_slice(&mut src[..6]);
            let mut m = Some(m);
            while let Some(f) = m.take() {
                m = port.tx_one(f).err();
            }
        }
    }
}

fn ping(count: usize, size: usize, eal_args: &[&str]) -> Result<(), String> {
    let (_eal, pool, mut port) = open(eal_args)?;
    let me = port.mac_address().map_err(|e| e.to_string())?;
    let mut peer = BROADCAST;
    let mut rx = Vec::with_capacity(32);
    let mut rtts = Vec::with_capacity(count);
    for seq in 0..(count + count / 10) as u64 {
        let m = frame(&pool, peer, me, seq, size)?;
        let t0 = Instant::now();
        port.tx_one(m).map_err(|_| "tx queue full")?;
        'wait: loop {
            if port.rx_burst(&mut rx) == 0 {
                if t0.elapsed() > Duration::from_secs(1) {
                    return Err(format!("no reply to frame {seq} within 1 s"));
                }
                continue;
            }
            for m in rx.drain(..) {
                let d = m.data();
                if is_ours(&m) && d[ETHER_HDR_LEN..ETHER_HDR_LEN + 8] == seq.to_le_bytes() {
                    if d.len() != size || d[0..6] != me.0 {
                        return Err(format!("bad reply to frame {seq}"));
                    }
                    peer = EtherAddr(d[6..12].try_into().map_err(|_| "short")?);
                    break 'wait;
                }
            }
        }
        if seq >= (count / 10) as u64 {
            rtts.push(t0.elapsed().as_nanos() as u64);
        }
    }
    let stop = frame(&pool, peer, me, u64::MAX, size.max(64))?;
    let _ = port.tx_one(stop);
    std::thread::sleep(Duration::from_millis(10));
    rtts.sort_unstable();
    let p = |q: f64| rtts[((rtts.len() as f64 * q) as usize).min(rtts.len() - 1)] as f64 / 1000.0;
    println!(
        "{} x {size} B: RTT p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us, max {:.2} us",
        rtts.len(),
        p(0.5),
        p(0.99),
        p(0.999),
        p(1.0)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let eal_args: Vec<&str> = args[(split + 1).min(args.len())..]
        .iter()
        .map(String::as_str)
        .collect();
    let mine: Vec<&str> = args[1..split].iter().map(String::as_str).collect();
    let result = match mine.as_slice() {
        ["echo"] => echo(&eal_args),
        ["ping", count, size] => match (count.parse(), size.parse::<usize>()) {
            (Ok(c), Ok(s)) if c > 0 && s >= ETHER_HDR_LEN + 8 => ping(c, s, &eal_args),
            _ => Err("COUNT > 0, SIZE >= 22".into()),
        },
        _ => Err(
            "usage: l2_pingpong echo -- <EAL args> | l2_pingpong ping COUNT SIZE -- <EAL args>"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2_pingpong: {e}");
            ExitCode::FAILURE
        }
    }
}
