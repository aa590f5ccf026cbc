//! The kernel side, seen from the agent: load the object, attach it to the pods' cgroup,
//! pin maps and links so steering survives an agent restart, and keep the maps in sync.
//!
//! Layout under bpffs: `/sys/fs/bpf/<name>/v<SCHEMA>/maps/<MAP>` and `.../links/<program>`.

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuHashMap, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
    },
};
mod addr;
mod fast_path;

use crate::config::Cidr;
pub use addr::{decode as decode_addr, flow_key};
pub use fast_path::{FastPathCredits, REPORT_EVERY as FAST_PATH_REPORT_EVERY};
use mesh_common::{
    EnrolledPod, FastKey, FlowKey, OrigDst, PodStats, SCHEMA_VERSION, Settings, SockAddr, maps,
    programs,
};

/// The object built by `cargo xtask build-ebpf`, embedded at build time (see build.rs).
/// Aligned so aya can parse the ELF in place.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("preparing pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinning link of {name} at {path}: {source}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link of {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
}

type Result<T, E = EbpfError> = std::result::Result<T, E>;

/// The directory holding everything the agent named `name` pins.
pub fn pin_root(name: &str) -> PathBuf {
    Path::new("/sys/fs/bpf").join(name)
}

/// bpf_link attachments to a cgroup take no attach flags (the kernel refuses any) and always
/// coexist with other programs, as BPF_F_ALLOW_MULTI does; `Single` is aya's "no flags".
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The programs the agent attaches, by attach kind.
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::BIND4,
    programs::BIND6,
];

/// Loaded, attached programs and handles to their maps.
pub struct Datapath {
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    pod_stats: PerCpuHashMap<MapData, u64, PodStats>,
    orig_dst: Arc<OrigDstTable>,
    excluded_ports: HashMap<MapData, u16, u8>,
    excluded_cidrs: LpmTrie<MapData, [u8; 16], u8>,
    inbound_listeners: SockHash<MapData, SockAddr>,
    local_pod_ips: HashMap<MapData, SockAddr, u8>,
    transparent_sources: Arc<TransparentSources>,
    /// Present when the fast path is on.
    fast_path: Option<Arc<FastPathCredits>>,
    link_dir: PathBuf,
    /// Keeps the programs loaded while the agent runs (the pinned links keep them attached
    /// after it exits) and attaches sk_lookup to pods as they are enrolled.
    ebpf: Ebpf,
    attached: Vec<AttachedProgram>,
}

/// A program as the status API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttachedProgram {
    pub name: &'static str,
    pub cgroup: PathBuf,
    pub pin: PathBuf,
}

impl Datapath {
    /// Loads the programs, reusing maps pinned by an earlier agent of the same name, and
    /// attaches them to `cgroup`, replacing the links an earlier agent pinned without a gap
    /// in steering (the new link is attached before the old one is removed).
    pub fn load(name: &str, cgroup: &Path, settings: Settings) -> Result<Self> {
        let version_dir = pin_root(name).join(format!("v{SCHEMA_VERSION}"));
        let map_dir = version_dir.join("maps");
        let link_dir = version_dir.join("links");
        for dir in [&map_dir, &link_dir] {
            fs::create_dir_all(dir).map_err(|source| EbpfError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .load(OBJECT)?;
        let cgroup_file = fs::File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;

        // aya's program types share these methods but no trait: one macro attaches either.
        macro_rules! attach_to_cgroup {
            ($kind:ty, $name:expr) => {{
                let name = $name;
                let program: &mut $kind = program_mut(&mut ebpf, name)?;
                let error = |source| EbpfError::Program { name, source };
                program.load().map_err(error)?;
                let id = program.attach(&cgroup_file, LINK_MODE).map_err(error)?;
                let link = program.take_link(id).map_err(error)?;
                let link =
                    FdLink::try_from(link).map_err(|source| EbpfError::Link { name, source })?;
                pin_link(name, link, &link_dir, cgroup)?
            }};
        }
        let mut attached = Vec::new();
        let mut fast_path_credits = None;
        for name in SOCK_ADDR_PROGRAMS {
            attached.push(attach_to_cgroup!(CgroupSockAddr, name));
        }
        attached.push(attach_to_cgroup!(SockOps, programs::SOCK_OPS));
        if settings.fast_path != 0 {
            let fast_path: SockHash<MapData, FastKey> = take_map(&mut ebpf, maps::FAST_PATH)?;
            let name = programs::SK_MSG;
            let program: &mut SkMsg = program_mut(&mut ebpf, name)?;
            let error = |source| EbpfError::Program { name, source };
            program.load().map_err(error)?;
            program.attach(fast_path.fd()).map_err(error)?;
            fast_path_credits = Some(Arc::new(FastPathCredits::new(take_map(
                &mut ebpf,
                maps::FAST_CONSUMED,
            )?)));
            attached.push(AttachedProgram {
                name,
                cgroup: cgroup.to_owned(),
                pin: map_dir.join(maps::FAST_PATH),
            });
        }
        // The agent's own sockets of the fast path's hops (its accepted and upstream sockets in
        // a pod) belong to the agent's cgroup: sock_ops must see them there too.
        let own_link = link_dir.join(fast_path::OWN_CGROUP_LINK);
        match fast_path::own_cgroup(cgroup) {
            Some(own) if settings.fast_path != 0 => {
                let own_file = fs::File::open(&own).map_err(|source| EbpfError::Cgroup {
                    path: own.clone(),
                    source,
                })?;
                let name = programs::SOCK_OPS;
                let program: &mut SockOps = program_mut(&mut ebpf, name)?;
                let error = |source| EbpfError::Program { name, source };
                let id = program.attach(&own_file, LINK_MODE).map_err(error)?;
                let link = program.take_link(id).map_err(error)?;
                let link =
                    FdLink::try_from(link).map_err(|source| EbpfError::Link { name, source })?;
                attached.push(pin_link_at(name, link, &own_link, &own)?);
            }
            _ => {
                // Off (or not needed): a link an earlier agent left goes.
                if let Ok(old) = PinnedLink::from_pin(&own_link) {
                    let _ = old.unpin();
                }
                let _ = fs::remove_file(&own_link);
            }
        }

        // sk_lookup attaches per pod network namespace, at enrollment.
        let name = programs::SK_LOOKUP;
        let program: &mut SkLookup = program_mut(&mut ebpf, name)?;
        program
            .load()
            .map_err(|source| EbpfError::Program { name, source })?;

        let mut settings_map: Array<MapData, Settings> = take_map(&mut ebpf, maps::SETTINGS)?;
        settings_map
            .set(0, settings, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::SETTINGS,
                source,
            })?;
        Ok(Self {
            enrolled: take_map(&mut ebpf, maps::ENROLLED)?,
            pod_stats: take_map(&mut ebpf, maps::POD_STATS)?,
            orig_dst: Arc::new(OrigDstTable {
                map: parking_lot::Mutex::new(take_map(&mut ebpf, maps::ORIG_DST_BY_FLOW)?),
            }),
            excluded_ports: take_map(&mut ebpf, maps::EXCLUDED_PORTS)?,
            excluded_cidrs: take_map(&mut ebpf, maps::EXCLUDED_CIDRS)?,
            inbound_listeners: take_map(&mut ebpf, maps::INBOUND_LISTENERS)?,
            local_pod_ips: take_map(&mut ebpf, maps::LOCAL_POD_IPS)?,
            transparent_sources: Arc::new(TransparentSources {
                map: parking_lot::Mutex::new(take_map(&mut ebpf, maps::TRANSPARENT_SOURCES)?),
            }),
            fast_path: fast_path_credits,
            link_dir,
            ebpf,
            attached,
        })
    }

    pub fn programs(&self) -> &[AttachedProgram] {
        &self.attached
    }

    /// The original-destination table, for the proxy's hot path: a handle of its own, so
    /// accepting a connection never waits on enrollment or on a status read.
    pub fn orig_dst(&self) -> Arc<OrigDstTable> {
        self.orig_dst.clone()
    }

    /// The sources of the proxy's transparent connects, for the hot path (a handle of its own,
    /// like [`orig_dst`](Self::orig_dst)).
    pub fn transparent_sources(&self) -> Arc<TransparentSources> {
        self.transparent_sources.clone()
    }

    /// What the agent has read of the fast path's redirected data, for the hot path; `None`
    /// when the fast path is off.
    pub fn fast_path(&self) -> Option<Arc<FastPathCredits>> {
        self.fast_path.clone()
    }

    /// Steers the pod in network namespace `netns_cookie` through the proxy.
    pub fn enroll(&mut self, netns_cookie: u64, pod: EnrolledPod) -> Result<()> {
        self.enrolled
            .insert(netns_cookie, pod, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::ENROLLED,
                source,
            })
    }

    /// Stops steering the pod: outbound capture, inbound capture (its sk_lookup link) and its
    /// counters all go.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<()> {
        ignore_missing(self.enrolled.remove(&netns_cookie), maps::ENROLLED)?;
        ignore_missing(self.pod_stats.remove(&netns_cookie), maps::POD_STATS)?;
        let pin = self.pod_link_pin(netns_cookie);
        if let Ok(link) = PinnedLink::from_pin(&pin) {
            let _ = link.unpin();
        }
        let _ = fs::remove_file(&pin);
        Ok(())
    }

    fn pod_link_pin(&self, netns_cookie: u64) -> PathBuf {
        self.link_dir
            .join(format!("{}-{netns_cookie}", programs::SK_LOOKUP))
    }

    /// Hands the pod's inbound listener to the sk_lookup program for each of its IPs.
    pub fn set_inbound_listeners(&mut self, listeners: &[(IpAddr, &dyn AsRawFd)]) -> Result<()> {
        for (ip, listener) in listeners {
            self.inbound_listeners
                .insert(encode_ip(*ip), listener.as_raw_fd(), 0)
                .map_err(|source| EbpfError::Map {
                    name: maps::INBOUND_LISTENERS,
                    source,
                })?;
            self.local_pod_ips
                .insert(encode_ip(*ip), 1, 0)
                .map_err(|source| EbpfError::Map {
                    name: maps::LOCAL_POD_IPS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Attaches inbound capture (sk_lookup) to the pod's network namespace, given as an open
    /// handle of it.
    pub fn capture_inbound(&mut self, netns_cookie: u64, netns: impl AsFd) -> Result<()> {
        let name = programs::SK_LOOKUP;
        let program: &mut SkLookup = program_mut(&mut self.ebpf, name)?;
        let id = program
            .attach(netns)
            .map_err(|source| EbpfError::Program { name, source })?;
        let link: FdLink = program
            .take_link(id)
            .map_err(|source| EbpfError::Program { name, source })?
            .into();
        let pin = self.pod_link_pin(netns_cookie);
        let _ = fs::remove_file(&pin);
        link.pin(&pin).map_err(|source| EbpfError::PinLink {
            name,
            path: pin,
            source,
        })?;
        Ok(())
    }

    /// Forgets the inbound listeners of these pod IPs.
    pub fn release_inbound(&mut self, ips: &[IpAddr]) {
        for ip in ips {
            let _ = self.inbound_listeners.remove(&encode_ip(*ip));
            let _ = self.local_pod_ips.remove(&encode_ip(*ip));
        }
    }

    /// The netns cookies the maps say are enrolled (some may be left by an earlier agent).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(|key| key.ok()).collect()
    }

    /// Counters of one pod, summed over CPUs.
    pub fn pod_stats(&self, netns_cookie: u64) -> PodStats {
        let Ok(per_cpu) = self.pod_stats.get(&netns_cookie, 0) else {
            return PodStats::default();
        };
        per_cpu
            .iter()
            .fold(PodStats::default(), |sum, cpu| PodStats {
                captured: sum.captured + cpu.captured,
                skipped: sum.skipped + cpu.skipped,
                no_listener: sum.no_listener + cpu.no_listener,
                fast_path: sum.fast_path + cpu.fast_path,
            })
    }

    /// Makes the node-wide excluded destination ports exactly `ports`.
    pub fn set_excluded_ports(&mut self, ports: &[u16]) -> Result<()> {
        let name = maps::EXCLUDED_PORTS;
        let stale: Vec<u16> = self
            .excluded_ports
            .keys()
            .filter_map(|key| key.ok())
            .filter(|port| !ports.contains(port))
            .collect();
        for port in stale {
            ignore_missing(self.excluded_ports.remove(&port), name)?;
        }
        for port in ports {
            self.excluded_ports
                .insert(port, 1, 0)
                .map_err(|source| EbpfError::Map { name, source })?;
        }
        Ok(())
    }

    /// Makes the node-wide excluded destination networks exactly `cidrs`.
    pub fn set_excluded_cidrs(&mut self, cidrs: &[Cidr]) -> Result<()> {
        let name = maps::EXCLUDED_CIDRS;
        let wanted: Vec<Key<[u8; 16]>> = cidrs.iter().map(cidr_key).collect();
        let stale: Vec<Key<[u8; 16]>> = self
            .excluded_cidrs
            .keys()
            .filter_map(|key| key.ok())
            .filter(|key| {
                !wanted
                    .iter()
                    .any(|w| w.prefix_len() == key.prefix_len() && w.data() == key.data())
            })
            .collect();
        for key in stale {
            ignore_missing(self.excluded_cidrs.remove(&key), name)?;
        }
        for key in &wanted {
            self.excluded_cidrs
                .insert(key, 1, 0)
                .map_err(|source| EbpfError::Map { name, source })?;
        }
        Ok(())
    }
}

/// Original destinations of captured connects, written by sock_ops, taken by the proxy on
/// accept. Its lock is held for one lookup and one delete (two map syscalls) and by nothing
/// else; aya's delete wants `&mut` though the kernel map needs no exclusion.
pub struct OrigDstTable {
    map: parking_lot::Mutex<HashMap<MapData, FlowKey, OrigDst>>,
}

impl OrigDstTable {
    /// The original destination of the connection `key`, read and removed.
    pub fn take(&self, key: &FlowKey) -> Option<SocketAddr> {
        let mut map = self.map.lock();
        let orig = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        decode_addr(&orig.dst)
    }
}

/// The client addresses (with port) the proxy's transparent sockets are connecting from, so
/// that sk_lookup does not hand their SYNs to the inbound listener. One lock for the insert
/// and one for the removal per connect.
pub struct TransparentSources {
    map: parking_lot::Mutex<HashMap<MapData, SockAddr, u8>>,
}

impl TransparentSources {
    /// Registers `source` until the returned guard drops (once connected, or given up).
    pub fn hold(self: &Arc<Self>, source: SocketAddr) -> Result<SourceHeld> {
        let key = addr::encode(SocketAddr::new(source.ip().to_canonical(), source.port()));
        self.map
            .lock()
            .insert(key, 0, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::TRANSPARENT_SOURCES,
                source,
            })?;
        Ok(SourceHeld {
            table: self.clone(),
            key,
        })
    }
}

/// A registered transparent source; removed on drop.
pub struct SourceHeld {
    table: Arc<TransparentSources>,
    key: SockAddr,
}

impl Drop for SourceHeld {
    fn drop(&mut self) {
        let _ = self.table.map.lock().remove(&self.key);
    }
}

/// A network as the connect programs key it: IPv6, IPv4 mapped into ::ffff:0:0/96.
fn cidr_key(cidr: &Cidr) -> Key<[u8; 16]> {
    match cidr.addr {
        IpAddr::V4(v4) => Key::new(96 + u32::from(cidr.prefix), v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => Key::new(u32::from(cidr.prefix), v6.octets()),
    }
}

/// A pod IP as the sk_lookup program keys it (port 0).
fn encode_ip(ip: IpAddr) -> SockAddr {
    addr::encode(SocketAddr::new(ip.to_canonical(), 0))
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(EbpfError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    program
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// Pins `link` at `<link_dir>/<name>`, replacing (and so detaching) a link an earlier agent
/// left there: the new program is attached before the old link goes.
fn pin_link(
    name: &'static str,
    link: FdLink,
    link_dir: &Path,
    cgroup: &Path,
) -> Result<AttachedProgram> {
    pin_link_at(name, link, &link_dir.join(name), cgroup)
}

/// As [`pin_link`], at `path`.
fn pin_link_at(
    name: &'static str,
    link: FdLink,
    path: &Path,
    cgroup: &Path,
) -> Result<AttachedProgram> {
    let path = path.to_owned();
    if let Ok(old) = PinnedLink::from_pin(&path) {
        // Unpinning drops the last reference to the old link, which detaches it.
        let _ = old.unpin();
    }
    let _ = fs::remove_file(&path);
    let pinned = link.pin(&path).map_err(|source| EbpfError::PinLink {
        name,
        path: path.clone(),
        source,
    })?;
    // The pin holds the link; our handle may go.
    drop(pinned);
    Ok(AttachedProgram {
        name,
        cgroup: cgroup.to_owned(),
        pin: path,
    })
}

fn ignore_missing(result: Result<(), aya::maps::MapError>, name: &'static str) -> Result<()> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(EbpfError::Map { name, source }),
    }
}

/// Removes everything the agent named `name` pinned: links (which detaches the programs)
/// and maps. Used by `mesh-agent uninstall`; a SIGTERM leaves steering in place.
pub fn uninstall(name: &str) -> io::Result<bool> {
    let root = pin_root(name);
    if !root.exists() {
        return Ok(false);
    }
    fs::remove_dir_all(&root)?;
    Ok(true)
}
