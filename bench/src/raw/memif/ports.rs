//! This process's one DPDK EAL and its port pairs (the `dpdk` feature).
//!
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use dpdk_sys::{af_packet_vdev, af_xdp_vdev, memif_vdev, EalArgs, MemifRole, Mempool, Port};

use super::{Kind, WANTED};

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    /// Port pairs made for this medium.
    fn pairs(self) -> usize {
        self.channels()
    }

    /// The veth pair: (the backup / echo side's end, the primary / timing side's end).
    fn veth(self) -> Option<(&'static str, &'static str)> {
        match self {
            Kind::Memif => None,
            Kind::AfPacket => Some(("ftvm-ap0", "ftvm-ap1")),
            Kind::AfXdp => Some(("ftvm-xd0", "ftvm-xd1")),
        }
    }
}

/// Largest raw ping-pong payload: one standard Ethernet frame's worth.
pub const MAX_RAW_PAYLOAD: usize = 1500;
/// Descriptors per rx/tx queue.
const QUEUE: u16 = 1024;
/// mbufs in each port's pool.
const POOL_MBUFS: u32 = 4095;
/// How long to wait for a link to come up.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);

/// Two ports joined to each other: the backup / echo side uses `server`, the primary /
/// timing side `client`.
#[derive(Debug)]
pub struct MemifPair {
    pub server: Port,
    pub client: Port,
}

#[derive(Debug)]
struct State {
    eal: dpdk_sys::Eal,
    dir: PathBuf,
    /// Per [`Kind`], by `Kind::index`.
    pairs: Mutex<[Vec<MemifPair>; 3]>,
    kinds: Vec<Kind>,
}

static STATE: OnceLock<Result<State, String>> = OnceLock::new();

fn state() -> anyhow::Result<&'static State> {
    // EAL init pins the calling thread to its main lcore; run it on a thread of its own so
    // that no benchmark thread (nor a thread spawned from one later) inherits that.
    STATE
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("dpdk-init".into())
                .spawn(|| init().map_err(|e| format!("{e:#}")))
                .map_err(|e| format!("spawning the DPDK init thread: {e}"))
                .and_then(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err("the DPDK init thread panicked".into()))
                })
        })
        .as_ref()
        .map_err(|e| anyhow!("DPDK (EAL with the benchmark's ports) is unavailable: {e}"))
}

fn init() -> anyhow::Result<State> {
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("ftvm-bench-{pid}-memif"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    match init_in(&dir, pid) {
        Ok(state) => Ok(state),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// The EAL's memory (`-m`), in MB.
const EAL_MEM_MB: u32 = 512;
/// 2 MiB hugepages that memory takes when the EAL runs from hugepages (for net_af_xdp).
const HUGEPAGES: u32 = EAL_MEM_MB / 2;

/// Sets up what the veth-based ports need on this machine — the veth pairs of [`Kind::veth`]
/// and, with `hugepages`, [`HUGEPAGES`] 2 MiB pages on hugetlbfs — by running
/// `scripts/dpdk-setup.sh`, then checks that they are there.
///
/// The script is the one place these steps live: CI (`scripts/test.sh`) and a person setting up
/// a machine run it, and so does the bench, instead of repeating its `ip link` and
/// `nr_hugepages` steps in Rust. (A Rust function, e.g. in dpdk-sys, would need a binary for
/// the script's users as well; the script needs only the bench's sources, which a bench built
/// with cargo has.) It is found in the workspace this bench was built from, and is idempotent:
/// what exists is kept, and the pairs stay for the next run.
fn set_up_host(hugepages: bool) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dpdk-setup.sh");
    if !script.is_file() {
        bail!(
            "{} is missing: the bench runs it to create the veth pairs (and hugepages) of the \
             af_packet/af_xdp rows; run it as root from the ftvm sources, or measure dpdk-memif",
            script.display()
        );
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&script).stdout(std::io::stderr());
    if hugepages {
        cmd.env("FTVM_HUGEPAGES", HUGEPAGES.to_string());
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    // Without root the script does nothing and says so; the rows cannot run then.
    for kind in [Kind::AfPacket, Kind::AfXdp] {
        if let Some((a, b)) = kind.veth() {
            for end in [a, b] {
                if !Path::new("/sys/class/net").join(end).exists() {
                    bail!(
                        "no veth interface {end} after {}: the af_packet/af_xdp rows need root",
                        script.display()
                    );
                }
            }
        }
    }
    if hugepages {
        let path = "/proc/sys/vm/nr_hugepages";
        let have: u32 = std::fs::read_to_string(path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {path}"))?;
        if have < HUGEPAGES {
            bail!(
                "{have} hugepages after {}, the af_xdp row needs {HUGEPAGES} (root, and free \
                 memory)",
                script.display()
            );
        }
    }
    Ok(())
}

fn init_in(dir: &std::path::Path, pid: u32) -> anyhow::Result<State> {
    let mut kinds = WANTED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if kinds.is_empty() {
        kinds.push(Kind::Memif);
    }
    // The main lcore: a CPU this thread may run on. Benchmark threads are non-EAL threads
    // that pin themselves; each polls its own port's queues.
    let lcore = core_affinity::get_core_ids()
        .and_then(|ids| ids.first().map(|c| c.id))
        .unwrap_or(0);
    let lcore = u32::try_from(lcore).unwrap_or(0);
    let prefix = format!("ftvm-bench-{pid}");
    let hugepages = kinds.contains(&Kind::AfXdp);
    if kinds.iter().any(|k| k.veth().is_some()) {
        set_up_host(hugepages)?;
    }
    let mut args = EalArgs::base(&prefix, lcore, hugepages, EAL_MEM_MB);
    if hugepages {
        // net_af_xdp registers a mempool's memory as one UMEM from its first chunk: the
        // pool must be virtually contiguous, which IOVA-as-PA does not promise.
        args = args.arg("--iova-mode=va");
    }
    // (kind, pair number, server port name, client port name)
    let mut names: Vec<(Kind, String, String)> = Vec::new();
    for &kind in &kinds {
        match kind {
            Kind::Memif => {
                for k in 0..super::memif_pairs() {
                    let socket = dir.join(format!("memif{k}.sock"));
                    let (s, c) = (2 * k as u32, 2 * k as u32 + 1);
                    args = args
                        .vdev(memif_vdev(s, MemifRole::Server, &socket))
                        .vdev(memif_vdev(c, MemifRole::Client, &socket));
                    names.push((kind, format!("net_memif{s}"), format!("net_memif{c}")));
                }
            }
            Kind::AfPacket | Kind::AfXdp => {
                let Some((a, b)) = kind.veth() else { continue };
                let vdev = if kind == Kind::AfPacket {
                    af_packet_vdev
                } else {
                    af_xdp_vdev
                };
                let base = if kind == Kind::AfPacket {
                    "net_af_packet"
                } else {
                    "net_af_xdp"
                };
                args = args.vdev(vdev(0, a)).vdev(vdev(1, b));
                names.push((kind, format!("{base}0"), format!("{base}1")));
            }
        }
    }
    let eal = args
        .init()
        .with_context(|| format!("rte_eal_init {args}"))?;
    let set_up = || -> anyhow::Result<[Vec<MemifPair>; 3]> {
        let mut n = 0u32;
        let mut port = |name: &str, kind: Option<Kind>| -> anyhow::Result<Port> {
            n += 1;
            // A pool per port: the benchmark threads are not EAL lcores, so they have no
            // mempool cache, and two cores sharing one pool's ring would bounce its cache
            // lines on every alloc and free. Each port's frames (sent and received) come
            // from and go back to its own pool, touched by one thread.
            let pool = Mempool::with_ops(
                &format!("ftvm_bench{n}"),
                POOL_MBUFS,
                0,
                Mempool::DEFAULT_DATA_ROOM,
                // net_af_xdp: a LIFO pool. With DPDK's default FIFO ring pool, the PMD
                // stopped receiving here after a fixed number of packets that grew with the
                // pool size (1023 of 4095, 3069 of 8191: mbufs deep in the pool, refilled
                // into its fill queue, never came back with a packet); reusing the most
                // recently freed mbufs first, as an EAL thread's mempool cache does, works.
                kind.filter(|k| *k == Kind::AfXdp).map(|_| "stack"),
            )
            .with_context(|| format!("creating the mbuf pool for {name}"))?;
            let id = eal
                .port_by_name(name)
                .with_context(|| format!("EAL has no port {name}"))?;
            let mut port = Port::configure(id, &pool, QUEUE, QUEUE)
                .with_context(|| format!("configuring {name}"))?;
            port.start().with_context(|| format!("starting {name}"))?;
            Ok(port)
        };
        let mut pairs: [Vec<MemifPair>; 3] = Default::default();
        for (kind, s, c) in &names {
            pairs[kind.index()].push(MemifPair {
                server: port(s, Some(*kind))?,
                client: port(c, Some(*kind))?,
            });
        }
        Ok(pairs)
    };
    match set_up() {
        Ok(mut pairs) => {
            // Handed out from the back: pair 0 first.
            for p in &mut pairs {
                p.reverse();
            }
            Ok(State {
                eal,
                dir: dir.to_path_buf(),
                pairs: Mutex::new(pairs),
                kinds,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(eal.runtime_dir());
            Err(e)
        }
    }
}

/// A connected pair of ports of medium `kind` (initialising DPDK on first use).
pub fn take(kind: Kind) -> anyhow::Result<MemifPair> {
    let state = state()?;
    if !state.kinds.contains(&kind) {
        bail!(
            "DPDK was set up without {} ports (call raw::memif::want first)",
            kind.row()
        );
    }
    let pair = state.pairs.lock().unwrap_or_else(|e| e.into_inner())[kind.index()]
        .pop()
        .with_context(|| {
            format!(
                "all {} {} port pairs are used up (each channel over DPDK closes \
                 its ports, and DPDK is set up once per process)",
                kind.pairs(),
                kind.row()
            )
        })?;
    let deadline = Instant::now() + LINK_TIMEOUT;
    for port in [&pair.server, &pair.client] {
        while !port.link().with_context(|| port.name())?.up {
            if Instant::now() > deadline {
                bail!("link of {} not up after {LINK_TIMEOUT:?}", port.name());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(pair)
}

/// Returns a pair [`take`] handed out, for the next run.
pub fn give_back_kind(kind: Kind, pair: MemifPair) {
    if let Some(Ok(state)) = STATE.get() {
        state.pairs.lock().unwrap_or_else(|e| e.into_inner())[kind.index()].push(pair);
    }
}

/// Closes the ports still unused and removes the memif sockets' directory and the EAL's
/// runtime directory; does nothing if DPDK was never set up. The EAL itself stays (it cannot
/// be initialised again in this process), so call this once, before exiting.
///
/// (Closing both ends of a memif pair just before exiting used to crash the process now and
/// then, in DPDK's interrupt thread: `dpdk_sys::intr` says why and how `Port` avoids it.)
pub fn cleanup() {
    if let Some(Ok(state)) = STATE.get() {
        for p in state
            .pairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            p.clear();
        }
        let _ = std::fs::remove_dir_all(&state.dir);
        let _ = std::fs::remove_dir_all(state.eal.runtime_dir());
    }
}
