//! `shoal dataplane status`: what the kernel says is loaded, attached and counted.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{MapInfo, MapType, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        SchedClassifier, TcAttachType,
    },
};
use serde::{Deserialize, Serialize};
use shoal_common::{names, Counter, Verdict};

use crate::Dataplane;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataplaneStatus {
    pub bpffs_root: PathBuf,
    pub programs: Vec<AttachStatus>,
    pub maps: Vec<MapStatus>,
    pub counters: Vec<CounterStatus>,
}

/// One program and where it is attached.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AttachStatus {
    pub program: String,
    pub program_type: String,
    pub program_id: u32,
    /// e.g. `tcx/ingress`.
    pub attach_point: String,
    pub interface: String,
    pub link_id: u32,
    pub link_pin: PathBuf,
    /// Confirmed by asking the kernel which programs run on the interface's hook.
    pub attached: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MapStatus {
    pub name: String,
    pub map_type: String,
    pub map_id: u32,
    /// Keys present now, counted, for hash maps; None for arrays, whose every slot exists.
    pub entries: Option<u32>,
    pub max_entries: u32,
    pub pin: PathBuf,
}

/// Packets and bytes by verdict, summed over CPUs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CounterStatus {
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
    /// A packet shoal refused or could not handle (a drop reason), not traffic it sorted.
    pub refusal: bool,
    /// Packets with this verdict are dropped (the others are passed on).
    pub dropped: bool,
}

/// The ingress classifier's link and whether the kernel runs it on the interface's hook: all
/// a readiness check needs (the rest of the status walks every hash map).
pub(crate) fn ingress_attach(dataplane: &Dataplane) -> Result<AttachStatus> {
    let config = &dataplane.config;
    let link_pin = config.ingress_link_pin();
    let link = FdLink::from(
        PinnedLink::from_pin(&link_pin)
            .with_context(|| format!("opening pinned link {}", link_pin.display()))?,
    )
    .info()?;
    let (_, on_hook) = SchedClassifier::query_tcx(&config.interface, TcAttachType::Ingress)
        .with_context(|| format!("querying TCX ingress programs on {}", config.interface))?;
    Ok(AttachStatus {
        program: names::INGRESS_PROGRAM.to_owned(),
        program_type: "sched_cls".to_owned(),
        program_id: link.program_id(),
        attach_point: "tcx/ingress".to_owned(),
        interface: config.interface.clone(),
        link_id: link.id(),
        link_pin,
        attached: on_hook.iter().any(|p| p.id() == link.program_id()),
    })
}

pub(crate) fn read(dataplane: &Dataplane) -> Result<DataplaneStatus> {
    let config = &dataplane.config;
    let ingress = ingress_attach(dataplane)?;

    let mut maps = Vec::new();
    for name in [
        names::VERDICT_COUNTERS,
        names::INGRESS_SETTINGS,
        names::MESH_PORTS,
        names::MESH_CLOCK,
        names::MESH_MAGLEV,
        names::MESH_FLOWS,
        names::MESH_REPLIES,
        names::MESH_ORIGINS,
        names::MESH_COUNTERS,
        names::LB_SERVICES,
        names::LB_BACKENDS,
        names::LB_REVERSE,
        names::VXLAN_PEERS,
        names::OVERLAY_ENDPOINTS,
    ] {
        let pin = config.maps_dir().join(name);
        let info =
            MapInfo::from_pin(&pin).with_context(|| format!("reading map {}", pin.display()))?;
        let map_type = info.map_type().ok();
        let entries = match map_type {
            Some(MapType::Hash | MapType::LruHash) => Some(
                count_keys(&info)
                    .with_context(|| format!("counting the entries of {}", pin.display()))?,
            ),
            _ => None,
        };
        maps.push(MapStatus {
            name: name.to_owned(),
            map_type: map_type.map_or_else(|| "unknown".to_owned(), |t| format!("{t:?}")),
            map_id: info.id(),
            entries,
            max_entries: info.max_entries(),
            pin,
        });
    }

    let verdicts: PerCpuArray<_, Counter> = PerCpuArray::try_from(
        dataplane
            .ebpf
            .map(names::VERDICT_COUNTERS)
            .context("verdict counters missing")?,
    )?;
    let mut counters = Vec::new();
    for verdict in Verdict::ALL {
        let per_cpu = verdicts.get(&(verdict as u32), 0)?;
        counters.push(CounterStatus {
            verdict: verdict.name().to_owned(),
            packets: per_cpu.iter().map(|c| c.packets).sum(),
            bytes: per_cpu.iter().map(|c| c.bytes).sum(),
            refusal: verdict.is_refusal(),
            dropped: verdict.dropped(),
        });
    }

    Ok(DataplaneStatus {
        bpffs_root: config.bpffs_root.clone(),
        programs: vec![ingress],
        maps,
        counters,
    })
}

/// The keys a hash map holds now, walked with BPF_MAP_GET_NEXT_KEY (one call per key; aya
/// only walks maps whose key type it is given). Never more than the map's capacity, should
/// the walk restart because a key it stood on was deleted meanwhile (LRU eviction).
fn count_keys(info: &MapInfo) -> Result<u32> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
    /// The part of `union bpf_attr` BPF_MAP_GET_NEXT_KEY reads.
    #[repr(C)]
    struct NextKeyAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let fd = info.fd()?;
    let size = info.key_size() as usize;
    let (mut key, mut next) = (vec![0u8; size], vec![0u8; size]);
    let mut count = 0;
    while count < info.max_entries() {
        // The buffers are of the map's key size and outlive the call.
        let attr = NextKeyAttr {
            map_fd: fd.as_fd().as_raw_fd() as u32,
            _pad: 0,
            // No key: the first one.
            key: if count == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        match crate::bpf_syscall::bpf(BPF_MAP_GET_NEXT_KEY, &attr) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => break,
            Err(err) => return Err(err).context("bpf(BPF_MAP_GET_NEXT_KEY)"),
        }
        count += 1;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(count)
}
