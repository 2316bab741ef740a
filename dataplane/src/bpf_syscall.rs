//! The `bpf(2)` calls aya 0.14 has no API for (a cgroup device link to pin, a map walk
//! without knowing the key type), made directly.

use std::io;

/// `bpf(command, attr)`: the new descriptor or value the kernel returns.
pub(crate) fn bpf<T>(command: libc::c_int, attr: &T) -> io::Result<i32> {
    // SAFETY: `attr` is a `#[repr(C)]` head of `union bpf_attr` for `command`, valid for the
    // call; the kernel reads `size_of::<T>()` bytes of it and takes the rest as zero.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as i32)
    }
}
