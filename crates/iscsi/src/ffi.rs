//! The part of libiscsi's C API (iscsi/iscsi.h, iscsi/scsi-lowlevel.h, 1.19) this crate uses,
//! written by hand (a dozen functions do not justify bindgen and a libclang build dependency)
//! and loaded at run time: the binary builds and runs without libiscsi, and only an
//! `iscsi://` LUN needs it installed.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

#[repr(C)]
pub struct IscsiContext {
    _private: [u8; 0],
}

#[repr(C)]
pub struct ScsiTask {
    _private: [u8; 0],
}

/// `struct scsi_iovec`, which the header promises never to change.
#[repr(C)]
pub struct ScsiIovec {
    pub iov_base: *mut c_void,
    pub iov_len: usize,
}

/// The leading fields of `struct scsi_readcapacity16`.
#[repr(C)]
pub struct ReadCapacity16 {
    pub returned_lba: u64,
    pub block_length: u32,
}

/// `struct scsi_persistent_reserve_out_basic` (libiscsi marshals it into the data-out buffer
/// when the task is made).
#[repr(C)]
pub struct PrOutBasic {
    pub reservation_key: u64,
    pub service_action_reservation_key: u64,
    pub spec_i_pt: u8,
    pub all_tg_pt: u8,
    pub aptpl: u8,
}

/// `struct scsi_persistent_reserve_in_read_keys`: `num_keys` keys follow.
#[repr(C)]
pub struct PrReadKeys {
    pub prgeneration: u32,
    pub additional_length: u32,
    pub num_keys: c_int,
    pub keys: [u64; 0],
}

pub type CommandCb =
    extern "C" fn(iscsi: *mut IscsiContext, status: c_int, data: *mut c_void, private: *mut c_void);

pub const SCSI_STATUS_GOOD: c_int = 0;
pub const SCSI_STATUS_RESERVATION_CONFLICT: c_int = 0x18;
pub const PR_IN_READ_KEYS: c_int = 0;
pub const PR_OUT_RESERVE: c_int = 1;
pub const PR_OUT_PREEMPT: c_int = 4;
pub const PR_OUT_PREEMPT_AND_ABORT: c_int = 5;
pub const PR_OUT_REGISTER_AND_IGNORE_EXISTING_KEY: c_int = 6;
pub const PR_SCOPE_LU: c_int = 0;
pub const PR_TYPE_EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: c_int = 6;
pub const SCSI_STATUS_CANCELLED: c_int = 0x0f00_0000;
pub const SCSI_STATUS_TIMEOUT: c_int = 0x0f00_0002;
pub const ISCSI_SESSION_NORMAL: c_int = 2;
pub const ISCSI_HEADER_DIGEST_NONE_CRC32C: c_int = 1;

/// libiscsi's shared object (Debian and Ubuntu: package libiscsi7).
const SONAMES: [&str; 2] = ["libiscsi.so.7", "libiscsi.so"];

macro_rules! api {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;)*) => {
        /// The functions, resolved from the loaded library (kept loaded for the process).
        pub struct Api {
            $(pub $name: unsafe extern "C" fn($($ty),*) -> $ret,)*
            _lib: libloading::Library,
        }

        impl Api {
            fn load() -> Result<Api, LoadError> {
                let mut failed = Vec::new();
                let lib = SONAMES.iter().find_map(|name| {
                    // SAFETY: loading libiscsi runs only its own initialisers.
                    unsafe { libloading::Library::new(name) }
                        .map_err(|e| failed.push(e.to_string()))
                        .ok()
                });
                let lib = lib.ok_or_else(|| LoadError::NotInstalled(failed.join("; ")))?;
                $(
                    // SAFETY: the symbol has this C signature in libiscsi 1.19 (iscsi.h).
                    let $name = *unsafe {
                        lib.get::<unsafe extern "C" fn($($ty),*) -> $ret>(
                            concat!(stringify!($name), "\0").as_bytes(),
                        )
                    }
                    .map_err(|e| LoadError::MissingSymbol {
                        name: stringify!($name),
                        reason: e.to_string(),
                    })?;
                )*
                Ok(Api { $($name,)* _lib: lib })
            }
        }
    };
}

api! {
    fn iscsi_create_context(initiator_name: *const c_char) -> *mut IscsiContext;
    fn iscsi_destroy_context(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_get_error(iscsi: *mut IscsiContext) -> *const c_char;
    fn iscsi_set_targetname(iscsi: *mut IscsiContext, name: *const c_char) -> c_int;
    fn iscsi_set_session_type(iscsi: *mut IscsiContext, kind: c_int) -> c_int;
    fn iscsi_set_header_digest(iscsi: *mut IscsiContext, digest: c_int) -> c_int;
    fn iscsi_set_initiator_username_pwd(
        iscsi: *mut IscsiContext,
        user: *const c_char,
        passwd: *const c_char,
    ) -> c_int;
    fn iscsi_set_timeout(iscsi: *mut IscsiContext, timeout: c_int) -> c_int;
    fn iscsi_set_noautoreconnect(iscsi: *mut IscsiContext, state: c_int) -> ();
    fn iscsi_full_connect_sync(iscsi: *mut IscsiContext, portal: *const c_char, lun: c_int) -> c_int;
    fn iscsi_full_connect_async(
        iscsi: *mut IscsiContext,
        portal: *const c_char,
        lun: c_int,
        cb: CommandCb,
        private: *mut c_void,
    ) -> c_int;
    fn iscsi_get_fd(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_which_events(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_service(iscsi: *mut IscsiContext, revents: c_int) -> c_int;
    fn iscsi_readcapacity16_sync(iscsi: *mut IscsiContext, lun: c_int) -> *mut ScsiTask;
    fn iscsi_read16_iov_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        datalen: u32,
        blocksize: c_int,
        rdprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: CommandCb,
        private: *mut c_void,
        iov: *mut ScsiIovec,
        niov: c_int,
    ) -> *mut ScsiTask;
    fn iscsi_write16_iov_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        data: *mut u8,
        datalen: u32,
        blocksize: c_int,
        wrprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: CommandCb,
        private: *mut c_void,
        iov: *mut ScsiIovec,
        niov: c_int,
    ) -> *mut ScsiTask;
    fn iscsi_synchronizecache16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        num_blocks: u32,
        syncnv: c_int,
        immed: c_int,
        cb: CommandCb,
        private: *mut c_void,
    ) -> *mut ScsiTask;
    fn iscsi_persistent_reserve_out_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        sa: c_int,
        scope: c_int,
        kind: c_int,
        params: *mut c_void,
        cb: CommandCb,
        private: *mut c_void,
    ) -> *mut ScsiTask;
    fn iscsi_persistent_reserve_in_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        sa: c_int,
        xferlen: u16,
        cb: CommandCb,
        private: *mut c_void,
    ) -> *mut ScsiTask;
    fn scsi_task_get_status(task: *mut ScsiTask, sense: *mut c_void) -> c_int;
    fn scsi_datain_unmarshall(task: *mut ScsiTask) -> *mut c_void;
    fn scsi_free_scsi_task(task: *mut ScsiTask) -> ();
}

/// Why libiscsi cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("libiscsi is not installed (apt install libiscsi7): {0}")]
    NotInstalled(String),
    #[error("libiscsi lacks {name}: {reason}")]
    MissingSymbol { name: &'static str, reason: String },
}

static API: OnceLock<Result<Api, LoadError>> = OnceLock::new();

/// libiscsi, loaded on first use.
pub fn api() -> Result<&'static Api, LoadError> {
    API.get_or_init(Api::load).as_ref().map_err(Clone::clone)
}
