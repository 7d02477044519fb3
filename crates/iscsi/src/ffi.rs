//! The part of libiscsi's C API (iscsi/iscsi.h, iscsi/scsi-lowlevel.h, 1.19) this crate uses,
//! written by hand: a dozen functions do not justify bindgen and a libclang build dependency.

use std::ffi::{c_char, c_int, c_void};

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

pub type CommandCb =
    extern "C" fn(iscsi: *mut IscsiContext, status: c_int, data: *mut c_void, private: *mut c_void);

pub const SCSI_STATUS_GOOD: c_int = 0;
pub const SCSI_STATUS_CANCELLED: c_int = 0x0f00_0000;
pub const SCSI_STATUS_TIMEOUT: c_int = 0x0f00_0002;
pub const ISCSI_SESSION_NORMAL: c_int = 2;
pub const ISCSI_HEADER_DIGEST_NONE_CRC32C: c_int = 1;

#[link(name = "iscsi")]
extern "C" {
    pub fn iscsi_create_context(initiator_name: *const c_char) -> *mut IscsiContext;
    pub fn iscsi_destroy_context(iscsi: *mut IscsiContext) -> c_int;
    pub fn iscsi_get_error(iscsi: *mut IscsiContext) -> *const c_char;
    pub fn iscsi_set_targetname(iscsi: *mut IscsiContext, name: *const c_char) -> c_int;
    pub fn iscsi_set_session_type(iscsi: *mut IscsiContext, kind: c_int) -> c_int;
    pub fn iscsi_set_header_digest(iscsi: *mut IscsiContext, digest: c_int) -> c_int;
    pub fn iscsi_set_initiator_username_pwd(
        iscsi: *mut IscsiContext,
        user: *const c_char,
        passwd: *const c_char,
    ) -> c_int;
    pub fn iscsi_set_timeout(iscsi: *mut IscsiContext, timeout: c_int) -> c_int;
    pub fn iscsi_set_no_ua_on_reconnect(iscsi: *mut IscsiContext, state: c_int);
    pub fn iscsi_full_connect_sync(
        iscsi: *mut IscsiContext,
        portal: *const c_char,
        lun: c_int,
    ) -> c_int;
    pub fn iscsi_get_fd(iscsi: *mut IscsiContext) -> c_int;
    pub fn iscsi_which_events(iscsi: *mut IscsiContext) -> c_int;
    pub fn iscsi_service(iscsi: *mut IscsiContext, revents: c_int) -> c_int;
    pub fn iscsi_readcapacity16_sync(iscsi: *mut IscsiContext, lun: c_int) -> *mut ScsiTask;
    pub fn iscsi_read16_iov_task(
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
    pub fn iscsi_write16_iov_task(
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
    pub fn iscsi_synchronizecache16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        num_blocks: u32,
        syncnv: c_int,
        immed: c_int,
        cb: CommandCb,
        private: *mut c_void,
    ) -> *mut ScsiTask;
    pub fn scsi_task_get_status(task: *mut ScsiTask, sense: *mut c_void) -> c_int;
    pub fn scsi_datain_unmarshall(task: *mut ScsiTask) -> *mut c_void;
    pub fn scsi_free_scsi_task(task: *mut ScsiTask);
}
