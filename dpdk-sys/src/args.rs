//! EAL argument vectors: the combinations verified on this project's machines, built in one
//! place, and a user's `--eal "..."` string split like a shell would.

use std::fmt;
use std::path::Path;

use crate::error::DpdkError;
use crate::Eal;

/// A `net_memif` port's role: the server creates the socket, the client connects to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemifRole {
    /// Creates the control socket (`role=server`).
    Server,
    /// Connects to it (`role=client`).
    Client,
}

impl MemifRole {
    fn as_str(self) -> &'static str {
        match self {
            MemifRole::Server => "server",
            MemifRole::Client => "client",
        }
    }
}

/// EAL options (without a program name) for [`Eal::init`].
///
/// The constructors give the combinations verified here, one port each (port id 0), every
/// process with its own `--file-prefix` and main lcore:
///
/// | constructor | memory | needs |
/// |---|---|---|
/// | [`EalArgs::memif`] | `--no-huge -m 256` | nothing (no root) |
/// | [`EalArgs::af_packet`] | `--no-huge -m 256` | CAP_NET_RAW + CAP_NET_ADMIN, an interface (e.g. one end of a veth pair) |
/// | [`EalArgs::af_xdp`] | 2 MiB hugepages, `-m 256` | root, hugepages (`echo 128 > /proc/sys/vm/nr_hugepages`, hugetlbfs on `/dev/hugepages`) |
///
/// `--no-huge` cannot be combined with `--in-memory`. Add more devices with
/// [`EalArgs::vdev`] (and the `*_vdev` helpers), anything else with [`EalArgs::arg`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EalArgs {
    args: Vec<String>,
}

impl EalArgs {
    /// No options at all.
    pub fn new() -> Self {
        EalArgs::default()
    }

    /// The options every ftvm process uses: no PCI scan, no telemetry socket, main lcore
    /// `lcore`, runtime files under `prefix`; `--no-huge -m <mem_mb>` when `hugepages` is false,
    /// `-m <mem_mb>` from hugepages otherwise.
    pub fn base(prefix: &str, lcore: u32, hugepages: bool, mem_mb: u32) -> Self {
        let mut a = EalArgs::new();
        if !hugepages {
            a = a.arg("--no-huge");
        }
        a.arg("-m")
            .arg(mem_mb.to_string())
            .arg("--no-pci")
            .arg("--no-telemetry")
            .arg("-l")
            .arg(lcore.to_string())
            .arg("--file-prefix")
            .arg(prefix)
    }

    /// One `net_memif` port on the Unix socket `socket` (a path, not abstract), no hugepages.
    pub fn memif(role: MemifRole, socket: &Path, prefix: &str, lcore: u32) -> Self {
        EalArgs::base(prefix, lcore, false, 256).vdev(memif_vdev(0, role, socket))
    }

    /// One `net_af_packet` port on the kernel interface `iface`, no hugepages.
    pub fn af_packet(iface: &str, prefix: &str, lcore: u32) -> Self {
        EalArgs::base(prefix, lcore, false, 256).vdev(af_packet_vdev(0, iface))
    }

    /// One `net_af_xdp` port on queue 0 of the kernel interface `iface`, from hugepages.
    pub fn af_xdp(iface: &str, prefix: &str, lcore: u32) -> Self {
        EalArgs::base(prefix, lcore, true, 256).vdev(af_xdp_vdev(0, iface))
    }

    /// Splits `line` into arguments like a POSIX shell (whitespace separates; single quotes
    /// keep everything literally; double quotes keep whitespace and honour `\"`, `\\`, `\$`
    /// and `` \` ``; a backslash outside quotes escapes the next character). No expansion of
    /// any kind. An unterminated quote or a trailing backslash is an error.
    pub fn parse(line: &str) -> Result<Self, DpdkError> {
        Ok(EalArgs {
            args: split_shell(line)?,
        })
    }

    /// Appends one option or value.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Appends `--vdev=<spec>`.
    pub fn vdev(self, spec: impl AsRef<str>) -> Self {
        self.arg(format!("--vdev={}", spec.as_ref()))
    }

    /// Appends every argument of `other`.
    pub fn extend(mut self, other: EalArgs) -> Self {
        self.args.extend(other.args);
        self
    }

    /// The arguments.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The value of `--file-prefix` (either `--file-prefix X` or `--file-prefix=X`), if given.
    pub fn file_prefix(&self) -> Option<&str> {
        self.value_of("--file-prefix")
    }

    /// The value of option `name` (`name X` or `name=X`), the last one if given twice.
    pub fn value_of(&self, name: &str) -> Option<&str> {
        let mut found = None;
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if a == name {
                found = it.next().map(String::as_str);
            } else if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                found = Some(v);
            }
        }
        found
    }

    /// Whether any argument is exactly `a`.
    pub fn has(&self, a: &str) -> bool {
        self.args.iter().any(|x| x == a)
    }

    /// Checks combinations DPDK would reject with a less helpful message.
    pub fn validate(&self) -> Result<(), DpdkError> {
        if self.has("--no-huge") && self.has("--in-memory") {
            return Err(DpdkError::InvalidArgument(
                "--no-huge cannot be combined with --in-memory (use --file-prefix with --no-huge)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// [`EalArgs::validate`], then [`Eal::init`] with these arguments.
    pub fn init(&self) -> Result<Eal, DpdkError> {
        self.validate()?;
        let refs: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Eal::init(&refs)
    }
}

impl fmt::Display for EalArgs {
    /// Space-separated, each argument quoted if it needs it (so `parse` reads it back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.args.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=,./:@%+".contains(c));
            if plain {
                f.write_str(a)?;
            } else {
                write!(f, "'{}'", a.replace('\'', "'\\''"))?;
            }
        }
        Ok(())
    }
}

/// `net_memif<index>` with `role` on the Unix socket `socket` (`socket-abstract=no`).
pub fn memif_vdev(index: u32, role: MemifRole, socket: &Path) -> String {
    format!(
        "net_memif{index},role={},id=0,socket={},socket-abstract=no",
        role.as_str(),
        socket.display()
    )
}

/// `net_af_packet<index>` on the kernel interface `iface`.
pub fn af_packet_vdev(index: u32, iface: &str) -> String {
    format!("net_af_packet{index},iface={iface}")
}

/// `net_af_xdp<index>` on queue 0 of the kernel interface `iface`.
pub fn af_xdp_vdev(index: u32, iface: &str) -> String {
    format!("net_af_xdp{index},iface={iface},start_queue=0,queue_count=1")
}

/// Splits `line` as a POSIX shell would (quotes, backslash escapes; a `#` that starts a word
/// starts a comment). An unterminated quote or a trailing backslash is an error.
fn split_shell(line: &str) -> Result<Vec<String>, DpdkError> {
    shlex::split(line).ok_or_else(|| {
        DpdkError::InvalidArgument(format!(
            "EAL arguments {line:?}: unterminated quote or trailing backslash"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<String> {
        EalArgs::parse(s)
            .map(|a| a.args)
            .unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(split(""), Vec::<String>::new());
        assert_eq!(split("  -l 0   --no-huge "), ["-l", "0", "--no-huge"]);
        assert_eq!(
            split("--vdev='net_memif0,socket=/tmp/a b'"),
            ["--vdev=net_memif0,socket=/tmp/a b"]
        );
        assert_eq!(split(r#"a"b c"d"#), ["ab cd"]);
        assert_eq!(split(r#""x\"y\\z\n""#), [r#"x"y\z\n"#]);
        assert_eq!(split(r"a\ b c"), ["a b", "c"]);
        assert_eq!(split("''"), [""]);
        assert_eq!(split("'it'\\''s'"), ["it's"]);
        for bad in ["'open", "\"open", "x\\", "\"a\\", "-l 0 --vdev='net_memif0"] {
            match EalArgs::parse(bad) {
                Err(DpdkError::InvalidArgument(msg)) => {
                    assert!(msg.contains("unterminated quote"), "{bad:?}: {msg}")
                }
                other => panic!("{bad:?} must be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn display_round_trips() {
        let a = EalArgs::new()
            .arg("-l")
            .arg("0")
            .arg("a b")
            .arg("it's")
            .arg("");
        assert_eq!(EalArgs::parse(&a.to_string()).ok(), Some(a));
    }

    #[test]
    fn verified_combinations() {
        let m = EalArgs::memif(MemifRole::Server, Path::new("/tmp/m.sock"), "p1", 1);
        assert_eq!(
            m.to_string(),
            "--no-huge -m 256 --no-pci --no-telemetry -l 1 --file-prefix p1 \
             --vdev=net_memif0,role=server,id=0,socket=/tmp/m.sock,socket-abstract=no"
        );
        assert_eq!(m.file_prefix(), Some("p1"));
        let p = EalArgs::af_packet("veth0", "p2", 0);
        assert!(p.has("--no-huge"));
        assert!(p.has("--vdev=net_af_packet0,iface=veth0"));
        let x = EalArgs::af_xdp("veth1", "p3", 0);
        assert!(!x.has("--no-huge"));
        assert!(x.has("--vdev=net_af_xdp0,iface=veth1,start_queue=0,queue_count=1"));
        assert_eq!(
            EalArgs::parse("--file-prefix=zz -l 0")
                .ok()
                .and_then(|a| a.file_prefix().map(String::from)),
            Some("zz".into())
        );
        let bad = EalArgs::new().arg("--no-huge").arg("--in-memory");
        assert!(bad.validate().is_err());
    }
}
