//! A fake NVML for tests: a shared library (`libmgpu_fake_nvml.so`) that exports the NVML
//! functions mgpu calls, answering from a state file that the test writes, so that the daemon's
//! NVML code path runs in CI without a GPU. Load it with
//! `mgpu_scheduler_server --nvml-lib PATH` and name the state file in `MGPU_FAKE_NVML_STATE`.
//!
//! The state file is read again on every call, so a test changes the GPUs live by rewriting it
//! (use [`write_state`]: it replaces the file in one step). One item per line, `#` comments:
//!
//! ```text
//! gpu 0 80GiB name NVIDIA H100 80GB HBM3   # GPU INDEX, total memory, optional name (last)
//! gpu 1 24GiB util 35 10                   # utilisation: GPU % and memory %
//! gpu 2 24GiB lost                         # fallen off the bus: its calls fail (GPU_IS_LOST)
//! pid 4242 uses 30GiB on GPU 0             # a compute process and its memory
//! pid 4243 uses ? on GPU 1 graphics        # a graphics process, memory not available
//! fail nvmlDeviceGetComputeRunningProcesses_v3 unknown   # that call fails (`*`: every call)
//! ```
//!
//! Device count is the number of `gpu` lines; a GPU's memory in use is what its processes use.
//! A state file that is missing or does not parse makes every call fail with
//! `NVML_ERROR_UNKNOWN` (and says why on stderr). Never install this library on a real server.

#![allow(non_snake_case)]
// The exported functions follow NVML's C contract (valid pointers, buffer sizes as given).
#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_uint, c_void};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The environment variable that names the state file.
pub const STATE_ENV: &str = "MGPU_FAKE_NVML_STATE";

/// The library's file name as cargo builds it.
pub const LIBRARY_FILE: &str = "libmgpu_fake_nvml.so";

/// Where cargo put the library, for a test binary of the same workspace (`target/*/deps/`):
/// beside it when built as a dependency, one level up when built as a workspace member.
pub fn find_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(LIBRARY_FILE))
        .find(|p| p.is_file())
}

/// Replaces the state file with `text` in one step (the library may read it at any moment).
pub fn write_state(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

type Ret = c_uint;
type Device = *mut c_void;

pub const SUCCESS: Ret = 0;
pub const ERROR_UNINITIALIZED: Ret = 1;
pub const ERROR_INVALID_ARGUMENT: Ret = 2;
pub const ERROR_NOT_SUPPORTED: Ret = 3;
pub const ERROR_NO_PERMISSION: Ret = 4;
pub const ERROR_NOT_FOUND: Ret = 6;
pub const ERROR_INSUFFICIENT_SIZE: Ret = 7;
pub const ERROR_DRIVER_NOT_LOADED: Ret = 9;
pub const ERROR_TIMEOUT: Ret = 10;
pub const ERROR_GPU_IS_LOST: Ret = 15;
pub const ERROR_UNKNOWN: Ret = 999;

/// Error names a `fail` line may use, with their codes and NVML's messages.
const ERRORS: &[(&str, Ret, &str)] = &[
    ("success", SUCCESS, "Success\0"),
    ("uninitialized", ERROR_UNINITIALIZED, "Uninitialized\0"),
    (
        "invalid_argument",
        ERROR_INVALID_ARGUMENT,
        "Invalid Argument\0",
    ),
    ("not_supported", ERROR_NOT_SUPPORTED, "Not Supported\0"),
    (
        "no_permission",
        ERROR_NO_PERMISSION,
        "Insufficient Permissions\0",
    ),
    ("not_found", ERROR_NOT_FOUND, "Not Found\0"),
    (
        "insufficient_size",
        ERROR_INSUFFICIENT_SIZE,
        "Insufficient Size\0",
    ),
    (
        "driver_not_loaded",
        ERROR_DRIVER_NOT_LOADED,
        "Driver Not Loaded\0",
    ),
    ("timeout", ERROR_TIMEOUT, "Timeout\0"),
    ("gpu_is_lost", ERROR_GPU_IS_LOST, "GPU is lost\0"),
    ("unknown", ERROR_UNKNOWN, "Unknown Error\0"),
];

const NOT_AVAILABLE: u64 = u64::MAX;

/// One fake GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    pub index: u32,
    pub total: u64,
    pub name: String,
    pub util: (u32, u32),
    pub lost: bool,
}

/// One process on a fake GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    pub pid: u32,
    pub gpu: u32,
    /// Bytes; `None`: not available.
    pub used: Option<u64>,
    pub graphics: bool,
}

/// The parsed state file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub gpus: Vec<Gpu>,
    pub processes: Vec<Process>,
    /// Calls that fail (`*`: all), with their error codes.
    pub fails: Vec<(String, Ret)>,
}

fn size(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let units: [(&str, u64); 8] = [
        ("gib", 1 << 30),
        ("g", 1 << 30),
        ("mib", 1 << 20),
        ("m", 1 << 20),
        ("kib", 1 << 10),
        ("k", 1 << 10),
        ("b", 1),
        ("", 1),
    ];
    for (unit, factor) in units {
        if let Some(n) = lower.strip_suffix(unit) {
            if let Ok(n) = n.parse::<u64>() {
                return n
                    .checked_mul(factor)
                    .ok_or_else(|| format!("size too large: {s}"));
            }
        }
    }
    Err(format!("bad size '{s}' (e.g. 24GiB, 512MiB)"))
}

fn error_code(s: &str) -> Result<Ret, String> {
    ERRORS
        .iter()
        .find(|(name, _, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, code, _)| *code)
        .or_else(|| s.parse().ok())
        .ok_or_else(|| format!("unknown NVML error '{s}'"))
}

/// Parses a state file (format in the crate documentation).
pub fn parse(text: &str) -> Result<State, String> {
    let mut st = State::default();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        let bad = |why: String| format!("line {}: {why}: {raw}", n + 1);
        match words.as_slice() {
            [] => {}
            ["gpu", index, total, rest @ ..] => {
                let mut gpu = Gpu {
                    index: index.parse().map_err(|_| bad("bad GPU index".into()))?,
                    total: size(total).map_err(bad)?,
                    name: String::new(),
                    util: (0, 0),
                    lost: false,
                };
                let mut i = 0;
                while i < rest.len() {
                    match rest[i] {
                        "lost" => gpu.lost = true,
                        "util" => {
                            let pct = |k: usize| -> Result<u32, String> {
                                rest.get(k)
                                    .and_then(|v| v.parse().ok())
                                    .filter(|v| *v <= 100)
                                    .ok_or_else(|| bad("util takes percentages".into()))
                            };
                            gpu.util = (pct(i + 1)?, pct(i + 2)?);
                            i += 2;
                        }
                        "name" => {
                            gpu.name = rest[i + 1..].join(" ");
                            break;
                        }
                        other => return Err(bad(format!("unknown GPU attribute '{other}'"))),
                    }
                    i += 1;
                }
                if gpu.name.is_empty() {
                    gpu.name = format!("Fake GPU {}", gpu.index);
                }
                if st.gpus.iter().any(|g| g.index == gpu.index) {
                    return Err(bad("GPU listed twice".into()));
                }
                st.gpus.push(gpu);
            }
            ["pid", pid, "uses", used, "on", "GPU" | "gpu", gpu, rest @ ..] => {
                st.processes.push(Process {
                    pid: pid.parse().map_err(|_| bad("bad pid".into()))?,
                    gpu: gpu.parse().map_err(|_| bad("bad GPU index".into()))?,
                    used: match *used {
                        "?" => None,
                        s => Some(size(s).map_err(bad)?),
                    },
                    graphics: match rest {
                        [] | ["compute"] => false,
                        ["graphics"] => true,
                        _ => return Err(bad("expected 'compute' or 'graphics'".into())),
                    },
                });
            }
            ["fail", call, error] => st
                .fails
                .push((call.to_string(), error_code(error).map_err(bad)?)),
            _ => return Err(bad("not understood".into())),
        }
    }
    Ok(st)
}

fn load() -> Result<State, String> {
    let path =
        std::env::var_os(STATE_ENV).ok_or_else(|| format!("{STATE_ENV} names no state file"))?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", Path::new(&path).display()))?;
    parse(&text)
}

/// Runs one NVML call: loads the state, applies `fail` lines, then `f`. Never unwinds into C.
fn call(name: &str, f: impl FnOnce(&State) -> Ret) -> Ret {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let st = match load() {
            Ok(st) => st,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "fake NVML: {name}: {e}");
                return ERROR_UNKNOWN;
            }
        };
        if let Some((_, code)) = st.fails.iter().find(|(c, _)| c == name || c == "*") {
            return *code;
        }
        f(&st)
    }))
    .unwrap_or(ERROR_UNKNOWN)
}

/// The GPU behind a handle (handles are index + 1).
fn gpu_of(st: &State, device: Device) -> Result<&Gpu, Ret> {
    let index = (device as usize)
        .checked_sub(1)
        .ok_or(ERROR_INVALID_ARGUMENT)?;
    let gpu = st
        .gpus
        .iter()
        .find(|g| g.index as usize == index)
        .ok_or(ERROR_INVALID_ARGUMENT)?;
    if gpu.lost {
        return Err(ERROR_GPU_IS_LOST);
    }
    Ok(gpu)
}

fn device_call(name: &str, device: Device, f: impl FnOnce(&State, &Gpu) -> Ret) -> Ret {
    call(name, |st| match gpu_of(st, device) {
        Ok(gpu) => f(st, gpu),
        Err(code) => code,
    })
}

/// Copies `s` and a NUL into a C buffer of `len` bytes.
unsafe fn put_str(s: &str, buf: *mut c_char, len: c_uint) -> Ret {
    if buf.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
    *buf.add(bytes.len()) = 0;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> Ret {
    call("nvmlInit_v2", |_| SUCCESS)
}

#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    call("nvmlInitWithFlags", |_| SUCCESS)
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> Ret {
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    ERRORS
        .iter()
        .find(|(_, code, _)| *code == result)
        .map_or("Unknown Error\0", |(_, _, text)| text)
        .as_ptr()
        .cast()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, len: c_uint) -> Ret {
    call("nvmlSystemGetDriverVersion", |_| unsafe {
        put_str("999.99-fake", version, len)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    call("nvmlDeviceGetCount_v2", |st| {
        if count.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        unsafe { *count = st.gpus.len() as c_uint };
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut Device) -> Ret {
    let handle = (index as usize + 1) as Device;
    device_call("nvmlDeviceGetHandleByIndex_v2", handle, |_, _| {
        if device.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        unsafe { *device = handle };
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(device: Device, name: *mut c_char, len: c_uint) -> Ret {
    device_call("nvmlDeviceGetName", device, |_, g| unsafe {
        put_str(&g.name, name, len)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(device: Device, uuid: *mut c_char, len: c_uint) -> Ret {
    device_call("nvmlDeviceGetUUID", device, |_, g| unsafe {
        put_str(
            &format!("GPU-fa4e0000-0000-0000-0000-{:012}", g.index),
            uuid,
            len,
        )
    })
}

/// `nvmlMemory_t`.
#[repr(C)]
pub struct Memory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

fn used_on(st: &State, gpu: &Gpu) -> u64 {
    st.processes
        .iter()
        .filter(|p| p.gpu == gpu.index)
        .filter_map(|p| p.used)
        .fold(0u64, u64::saturating_add)
        .min(gpu.total)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: Device, memory: *mut Memory) -> Ret {
    device_call("nvmlDeviceGetMemoryInfo", device, |st, g| {
        if memory.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        let used = used_on(st, g);
        unsafe {
            *memory = Memory {
                total: g.total,
                free: g.total - used,
                used,
            }
        };
        SUCCESS
    })
}

/// `nvmlUtilization_t`.
#[repr(C)]
pub struct Utilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: Device,
    utilization: *mut Utilization,
) -> Ret {
    device_call("nvmlDeviceGetUtilizationRates", device, |_, g| {
        if utilization.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        unsafe {
            *utilization = Utilization {
                gpu: g.util.0,
                memory: g.util.1,
            }
        };
        SUCCESS
    })
}

/// `nvmlProcessInfo_t` (the v2 layout, which the `_v3` calls fill).
#[repr(C)]
pub struct ProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

unsafe fn processes(
    name: &str,
    device: Device,
    graphics: bool,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    device_call(name, device, |st, g| {
        if count.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        let list: Vec<&Process> = st
            .processes
            .iter()
            .filter(|p| p.gpu == g.index && p.graphics == graphics)
            .collect();
        // SAFETY: NVML's contract: `count` is valid, `infos` holds `*count` entries.
        unsafe {
            let room = *count as usize;
            *count = list.len() as c_uint;
            if room < list.len() {
                return ERROR_INSUFFICIENT_SIZE;
            }
            if list.is_empty() {
                return SUCCESS;
            }
            if infos.is_null() {
                return ERROR_INVALID_ARGUMENT;
            }
            for (i, p) in list.iter().enumerate() {
                *infos.add(i) = ProcessInfo {
                    pid: p.pid,
                    used_gpu_memory: p.used.unwrap_or(NOT_AVAILABLE),
                    gpu_instance_id: u32::MAX,
                    compute_instance_id: u32::MAX,
                };
            }
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    processes(
        "nvmlDeviceGetComputeRunningProcesses_v3",
        device,
        false,
        count,
        infos,
    )
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    processes(
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        device,
        true,
        count,
        infos,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let st = parse(
            "# GPUs\n\
             gpu 0 80GiB name NVIDIA H100 80GB HBM3\n\
             gpu 1 24GiB util 35 10\n\
             gpu 2 24576MiB lost\n\
             pid 4242 uses 30GiB on GPU 0\n\
             pid 4243 uses ? on GPU 1 graphics # no figure\n\
             fail nvmlDeviceGetComputeRunningProcesses_v3 unknown\n",
        )
        .unwrap();
        assert_eq!(st.gpus.len(), 3);
        assert_eq!(st.gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(st.gpus[0].total, 80 << 30);
        assert_eq!(st.gpus[1].util, (35, 10));
        assert_eq!(st.gpus[1].name, "Fake GPU 1");
        assert!(st.gpus[2].lost && st.gpus[2].total == 24 << 30);
        assert_eq!(st.processes[0].used, Some(30 << 30));
        assert!(st.processes[1].graphics && st.processes[1].used.is_none());
        assert_eq!(
            st.fails,
            vec![(
                "nvmlDeviceGetComputeRunningProcesses_v3".into(),
                ERROR_UNKNOWN
            )]
        );
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        for bad in [
            "gpu x 24GiB",
            "gpu 0 24 parsecs",
            "gpu 0 24GiB util 101 0",
            "gpu 0 24GiB\ngpu 0 24GiB",
            "pid 1 uses 3GiB on GPU",
            "pid 1 uses 3GiB on GPU 0 sideways",
            "fail nvmlInit_v2 bogus",
            "hello",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    /// The exported functions, called as NVML's users call them (one test: the state file is
    /// named by a process-wide variable).
    #[test]
    fn answers_from_the_state_file() {
        let dir = tempfile_dir();
        let path = dir.join("state");
        std::env::set_var(STATE_ENV, &path);
        write_state(
            &path,
            "gpu 0 8GiB name Tiny\ngpu 1 8GiB lost\npid 7 uses 1GiB on GPU 0\npid 8 uses 2GiB on GPU 0\n",
        )
        .unwrap();
        unsafe {
            assert_eq!(nvmlInit_v2(), SUCCESS);
            let mut n = 0;
            assert_eq!(nvmlDeviceGetCount_v2(&mut n), SUCCESS);
            assert_eq!(n, 2);
            let mut dev: Device = std::ptr::null_mut();
            assert_eq!(nvmlDeviceGetHandleByIndex_v2(0, &mut dev), SUCCESS);
            let mut lost: Device = std::ptr::null_mut();
            assert_eq!(
                nvmlDeviceGetHandleByIndex_v2(1, &mut lost),
                ERROR_GPU_IS_LOST
            );
            assert_eq!(
                nvmlDeviceGetHandleByIndex_v2(5, &mut lost),
                ERROR_INVALID_ARGUMENT
            );
            let mut name = [0 as c_char; 64];
            assert_eq!(nvmlDeviceGetName(dev, name.as_mut_ptr(), 64), SUCCESS);
            assert_eq!(
                std::ffi::CStr::from_ptr(name.as_ptr()).to_str().unwrap(),
                "Tiny"
            );
            assert_eq!(
                nvmlDeviceGetName(dev, name.as_mut_ptr(), 4),
                ERROR_INSUFFICIENT_SIZE
            );
            let mut mem = Memory {
                total: 0,
                free: 0,
                used: 0,
            };
            assert_eq!(nvmlDeviceGetMemoryInfo(dev, &mut mem), SUCCESS);
            assert_eq!((mem.total, mem.used, mem.free), (8 << 30, 3 << 30, 5 << 30));
            // The count first, then the list.
            let mut count = 0;
            assert_eq!(
                nvmlDeviceGetComputeRunningProcesses_v3(dev, &mut count, std::ptr::null_mut()),
                ERROR_INSUFFICIENT_SIZE
            );
            assert_eq!(count, 2);
            let mut infos: Vec<ProcessInfo> = (0..4)
                .map(|_| ProcessInfo {
                    pid: 0,
                    used_gpu_memory: 0,
                    gpu_instance_id: 0,
                    compute_instance_id: 0,
                })
                .collect();
            count = 4;
            assert_eq!(
                nvmlDeviceGetComputeRunningProcesses_v3(dev, &mut count, infos.as_mut_ptr()),
                SUCCESS
            );
            assert_eq!(count, 2);
            assert_eq!((infos[1].pid, infos[1].used_gpu_memory), (8, 2 << 30));
            count = 0;
            assert_eq!(
                nvmlDeviceGetGraphicsRunningProcesses_v3(dev, &mut count, std::ptr::null_mut()),
                SUCCESS
            );
            assert_eq!(count, 0);
            // Changed live: the next call sees it.
            write_state(
                &path,
                "gpu 0 8GiB\nfail nvmlDeviceGetMemoryInfo gpu_is_lost\n",
            )
            .unwrap();
            assert_eq!(nvmlDeviceGetMemoryInfo(dev, &mut mem), ERROR_GPU_IS_LOST);
            let text = std::ffi::CStr::from_ptr(nvmlErrorString(ERROR_GPU_IS_LOST));
            assert_eq!(text.to_str().unwrap(), "GPU is lost");
            std::fs::write(&path, "gpu zero").unwrap();
            assert_eq!(nvmlDeviceGetCount_v2(&mut n), ERROR_UNKNOWN);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fake-nvml-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
