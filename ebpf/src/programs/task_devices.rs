//! Which devices a task may use: Docker's default list, as the cgroup v2 device controller
//! (a program on the cgroup every task lives under). Tasks see the node's `/dev`; without it
//! a task running as root could read and write the node's disks, memory or kernel log
//! through it. Making device nodes (mknod, with CAP_MKNOD) is allowed, as in Docker; opening
//! one is not, unless listed.

use aya_ebpf::{macros::cgroup_device, programs::DeviceContext};

/// Return values of device programs: allow, or fail the access with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// `access_type` is `(BPF_DEVCG_ACC_* << 16) | BPF_DEVCG_DEV_*`.
const ACCESS_MKNOD: u32 = 1;
const DEVICE_CHAR: u32 = 2;

#[cgroup_device]
pub fn shoal_task_devices(ctx: DeviceContext) -> i32 {
    // SAFETY: the kernel hands a valid context for the program's run.
    let device = unsafe { &*ctx.device };
    let (kind, access) = (device.access_type & 0xffff, device.access_type >> 16);
    if access == ACCESS_MKNOD || (kind == DEVICE_CHAR && listed(device.major, device.minor)) {
        ALLOW
    } else {
        DENY
    }
}

/// Docker's default character devices: runc's `DefaultAllowedDevices`, which Docker keeps
/// for a container that is not privileged.
#[inline(always)]
fn listed(major: u32, minor: u32) -> bool {
    match major {
        // null, zero, full, random, urandom
        1 => matches!(minor, 3 | 5 | 7 | 8 | 9),
        // tty, console, ptmx
        5 => minor <= 2,
        // /dev/net/tun
        10 => minor == 200,
        // pseudo-terminals (/dev/pts/*)
        136 => true,
        _ => false,
    }
}
