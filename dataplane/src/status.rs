//! `shoal dataplane status`: what the kernel says is loaded, attached and counted.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use aya::{
    maps::{MapInfo, PerCpuArray},
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
    pub entries: u32,
    pub max_entries: u32,
    pub pin: PathBuf,
}

/// Packets and bytes by verdict, summed over CPUs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CounterStatus {
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

pub(crate) fn read(dataplane: &Dataplane) -> Result<DataplaneStatus> {
    let config = &dataplane.config;
    let link_pin = config.ingress_link_pin();
    let link = FdLink::from(
        PinnedLink::from_pin(&link_pin)
            .with_context(|| format!("opening pinned link {}", link_pin.display()))?,
    )
    .info()?;
    let (_, on_hook) = SchedClassifier::query_tcx(&config.interface, TcAttachType::Ingress)
        .with_context(|| format!("querying TCX ingress programs on {}", config.interface))?;
    let ingress = AttachStatus {
        program: names::INGRESS_PROGRAM.to_owned(),
        program_type: "sched_cls".to_owned(),
        program_id: link.program_id(),
        attach_point: "tcx/ingress".to_owned(),
        interface: config.interface.clone(),
        link_id: link.id(),
        link_pin,
        attached: on_hook.iter().any(|p| p.id() == link.program_id()),
    };

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
    ] {
        let pin = config.maps_dir().join(name);
        let info =
            MapInfo::from_pin(&pin).with_context(|| format!("reading map {}", pin.display()))?;
        maps.push(MapStatus {
            name: name.to_owned(),
            map_type: info
                .map_type()
                .map(|t| format!("{t:?}"))
                .unwrap_or_else(|_| "unknown".to_owned()),
            map_id: info.id(),
            // Capacity only: counting a hash map's keys would walk it.
            entries: info.max_entries(),
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
        });
    }

    Ok(DataplaneStatus {
        bpffs_root: config.bpffs_root.clone(),
        programs: vec![ingress],
        maps,
        counters,
    })
}
