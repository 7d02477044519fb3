//! One image on an SMB share, opened on the server's shared session: the section operations
//! the pipeline engine issues, and the reopen after the session was replaced.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use smb2::client::connection::Frame;
use smb2::msg::create::{
    CreateDisposition, CreateRequest, CreateResponse, ImpersonationLevel, ShareAccess,
};
use smb2::msg::flush::FlushRequest;
use smb2::msg::ioctl::IoctlRequest;
use smb2::msg::query_info::{InfoType, QueryInfoRequest, QueryInfoResponse};
use smb2::msg::read::ReadRequest;
use smb2::msg::set_info::SetInfoRequest;
use smb2::msg::write::{WriteRequest, WriteResponse};
use smb2::pack::{Pack, ReadCursor, Unpack};
use smb2::types::flags::{FileAccessMask, FileAttributes};
use smb2::types::status::NtStatus;
use smb2::types::{Command, CreditCharge, FileId, OplockLevel};
use twinpath_core::{lock, Error, ErrorKind, Result};
use twinpath_pipeline::{SectionData, SectionIo};

use crate::error::{smb_error, status_error};
use crate::session::{Server, Session, CREDIT_UNIT};

/// MS-FSCC 2.4.14 FileEndOfFileInformation.
const FILE_END_OF_FILE_INFORMATION: u8 = 20;
/// MS-FSCC 2.3.85: zero a byte range (the server may deallocate it).
const FSCTL_SET_ZERO_DATA: u32 = 0x0009_80c8;
/// MS-SMB2 2.2.31: the ioctl is an FSCTL.
const SMB2_0_IOCTL_IS_FSCTL: u32 = 1;
/// MS-FSCC 2.4.22 FileInternalInformation: the file's index number (its inode on a POSIX
/// server).
const FILE_INTERNAL_INFORMATION: u8 = 6;
/// MS-FSCC 2.5.9 FileFsVolumeInformation: the volume's serial number at byte 8.
const FILE_FS_VOLUME_INFORMATION: u8 = 1;
/// MS-SMB2 2.2.13: the image is a file, never a directory.
const FILE_NON_DIRECTORY_FILE: u32 = 0x40;
/// How long an open refused by share modes is tried again: the server may still be closing
/// the handles of a session that just ended (a daemon killed and restarted, a reconnect).
const SHARING_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Statuses after which the handle is gone although the connection lives: reopen it.
fn handle_gone(status: NtStatus) -> bool {
    matches!(
        status,
        NtStatus::FILE_CLOSED | NtStatus::NETWORK_NAME_DELETED | NtStatus::USER_SESSION_DELETED
    )
}

/// Which file a handle is open on. A reopen by path after a reconnect must find the same
/// one: share modes keep the image from being renamed or replaced while it is open, but not
/// its directory, and a client could put another file at the path meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    volume: u32,
    index: u64,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "file {} on volume {:#x}", self.index, self.volume)
    }
}

/// Asks the server about the file behind `file_id` (QUERY_INFO); `len` bytes at least.
async fn query_info(
    session: &Session,
    file_id: FileId,
    info_type: InfoType,
    class: u8,
    len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let req = QueryInfoRequest {
        info_type,
        file_info_class: class,
        output_buffer_length: 128,
        additional_information: 0,
        flags: 0,
        file_id,
        input_buffer: Vec::new(),
    };
    let frame = session
        .conn
        .execute(Command::QueryInfo, &req, Some(session.tree.tree_id))
        .await
        .map_err(|e| smb_error(what, e))?;
    if frame.header.status != NtStatus::SUCCESS {
        return Err(status_error(what, frame.header.status));
    }
    let out = QueryInfoResponse::unpack(&mut ReadCursor::new(&frame.body))
        .map_err(|e| smb_error(what, e))?
        .output_buffer;
    if out.len() < len {
        return Err(Error::new(
            ErrorKind::Io,
            format!("{what}: {} bytes in the reply, {len} expected", out.len()),
        ));
    }
    Ok(out)
}

async fn identity(session: &Session, file_id: FileId) -> Result<Identity> {
    let index = query_info(
        session,
        file_id,
        InfoType::File,
        FILE_INTERNAL_INFORMATION,
        8,
        "query the image's index number",
    )
    .await?;
    let volume = query_info(
        session,
        file_id,
        InfoType::Filesystem,
        FILE_FS_VOLUME_INFORMATION,
        12,
        "query the image's volume",
    )
    .await?;
    Ok(Identity {
        volume: u32::from_le_bytes(volume[8..12].try_into().unwrap()),
        index: u64::from_le_bytes(index[..8].try_into().unwrap()),
    })
}

/// Closes `file_id`; a failure is left to the session's end, which closes it too.
async fn close(session: &Session, file_id: FileId) {
    let mut conn = session.conn.clone();
    if let Err(e) = session.tree.close_handle(&mut conn, file_id).await {
        tracing::debug!("close: {e}");
    }
}

/// The image opened on one session.
struct Open {
    session: Arc<Session>,
    file_id: FileId,
}

/// What an image was opened as; a reopen asks for the same.
#[derive(Clone)]
pub(crate) struct ImageSpec {
    pub path: String,
    pub read_only: bool,
    pub create_size: Option<u64>,
    /// Share the image only with readers (the disk's `lock`).
    pub exclusive: bool,
}

pub(crate) struct SmbFile {
    server: Arc<Server>,
    spec: ImageSpec,
    size: u64,
    identity: Identity,
    open: Mutex<Option<Arc<Open>>>,
    reopen: tokio::sync::Mutex<()>,
    /// Closed for good (the disk stopped): never reopened.
    closed: AtomicBool,
    /// Credits charged by this disk's requests outstanding on the shared connection.
    in_flight: AtomicUsize,
    /// The configured section size cap, to turn credits into sections.
    section_len: Option<usize>,
    runtime: tokio::runtime::Handle,
}

/// Opens (or creates, with `create_size`) the image on `session`. Returns the handle, the
/// size and which file it is.
async fn open_image(session: &Session, spec: &ImageSpec) -> Result<(FileId, u64, Identity)> {
    let mut conn = session.conn.clone();
    let path = spec.path.as_str();
    let exists = match session.tree.stat(&mut conn, path).await {
        Ok(_) => true,
        Err(e) if e.kind() == smb2::ErrorKind::NotFound => false,
        Err(e) => return Err(smb_error("stat", e)),
    };
    if !exists && spec.create_size.is_none() {
        return Err(Error::new(
            ErrorKind::NotFound,
            "image does not exist (set create_size to create it)",
        ));
    }
    let (file_id, size) = create(session, spec).await?;
    // A handle left open on the shared session would keep the image locked (share modes)
    // for as long as the session lives.
    let checked = async {
        let identity = identity(session, file_id).await?;
        match (exists, spec.create_size) {
            (false, Some(create)) => {
                let req = SetInfoRequest {
                    info_type: InfoType::File,
                    file_info_class: FILE_END_OF_FILE_INFORMATION,
                    additional_information: 0,
                    file_id,
                    buffer: create.to_le_bytes().to_vec(),
                };
                let frame = conn
                    .execute(Command::SetInfo, &req, Some(session.tree.tree_id))
                    .await
                    .map_err(|e| smb_error("set size", e))?;
                if frame.header.status != NtStatus::SUCCESS {
                    return Err(status_error("set size", frame.header.status));
                }
                tracing::info!(path, size = create, "created image on the share");
                Ok((file_id, create, identity))
            }
            _ => Ok((file_id, size, identity)),
        }
    };
    let opened = checked.await;
    if opened.is_err() {
        close(session, file_id).await;
    }
    opened
}

/// The CREATE of the image. A disk that locks its image shares it only with readers, as
/// QEMU's image locks do: a writer anywhere else (another host, daemon or disk) is refused
/// with STATUS_SHARING_VIOLATION, and so is this open while another client writes.
fn create_request(spec: &ImageSpec) -> CreateRequest {
    let mut access = FileAccessMask::FILE_READ_DATA
        | FileAccessMask::FILE_READ_ATTRIBUTES
        | FileAccessMask::SYNCHRONIZE;
    if !spec.read_only {
        access |= FileAccessMask::FILE_WRITE_DATA | FileAccessMask::FILE_WRITE_ATTRIBUTES;
    }
    let share = if spec.exclusive {
        ShareAccess::FILE_SHARE_READ
    } else {
        ShareAccess::FILE_SHARE_READ
            | ShareAccess::FILE_SHARE_WRITE
            | ShareAccess::FILE_SHARE_DELETE
    };
    CreateRequest {
        requested_oplock_level: OplockLevel::None,
        impersonation_level: ImpersonationLevel::Impersonation,
        desired_access: FileAccessMask::new(access),
        file_attributes: FileAttributes::NORMAL,
        share_access: ShareAccess(share),
        create_disposition: if spec.create_size.is_some() {
            CreateDisposition::FileOpenIf
        } else {
            CreateDisposition::FileOpen
        },
        create_options: FILE_NON_DIRECTORY_FILE,
        name: smb2::name::encode_path(&spec.path),
        create_contexts: Vec::new(),
    }
}

/// Opens the image on `session`, trying again for a while when share modes refuse it.
async fn create(session: &Session, spec: &ImageSpec) -> Result<(FileId, u64)> {
    let req = create_request(spec);
    let deadline = tokio::time::Instant::now() + SHARING_PATIENCE;
    loop {
        let frame = session
            .conn
            .execute(Command::Create, &req, Some(session.tree.tree_id))
            .await
            .map_err(|e| smb_error("open", e))?;
        match frame.header.status {
            NtStatus::SUCCESS => {
                let resp = CreateResponse::unpack(&mut ReadCursor::new(&frame.body))
                    .map_err(|e| smb_error("open: CREATE reply", e))?;
                return Ok((resp.file_id, resp.end_of_file));
            }
            NtStatus::SHARING_VIOLATION if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            NtStatus::SHARING_VIOLATION => {
                let what = if spec.read_only {
                    "another client has it open for writing"
                } else {
                    "another client has it open for writing, or does not share it"
                };
                return Err(Error::new(
                    ErrorKind::InUse,
                    format!(
                        "open: the image is in use: {what} (the server answered \
                         STATUS_SHARING_VIOLATION for {}s); disks that share an image on \
                         purpose need `lock: false`",
                        SHARING_PATIENCE.as_secs()
                    ),
                ));
            }
            status => return Err(status_error("open", status)),
        }
    }
}

/// Credits one request pays: one per 64 KiB of payload (MS-SMB2 3.1.5.2).
fn charge(payload: usize) -> usize {
    payload.div_ceil(CREDIT_UNIT).max(1)
}

/// Counts a request's credits as outstanding, for the disk and for its connection, while it
/// lives.
struct Outstanding<'a> {
    counters: [&'a AtomicUsize; 2],
    credits: usize,
}

impl<'a> Outstanding<'a> {
    fn new(file: &'a SmbFile, payload: usize) -> Self {
        let credits = charge(payload);
        let counters = [&file.in_flight, file.server.in_flight()];
        for c in counters {
            c.fetch_add(credits, Ordering::Relaxed);
        }
        Outstanding { counters, credits }
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        for c in self.counters {
            c.fetch_sub(self.credits, Ordering::Relaxed);
        }
    }
}

impl SmbFile {
    /// Opens the image on `server`'s session; the disk counts as a user of the server's
    /// credits from here until it is dropped.
    pub(crate) async fn open(
        server: Arc<Server>,
        spec: ImageSpec,
        section_len: Option<usize>,
    ) -> Result<SmbFile> {
        let session = match server.session().await {
            Ok(s) => s,
            Err(e) => {
                server.leave();
                return Err(e);
            }
        };
        let opened = open_image(&session, &spec).await;
        let (file_id, size, identity) = match opened {
            Ok(o) => o,
            Err(e) => {
                server.leave();
                return Err(e);
            }
        };
        tracing::info!(
            server = %server.describe(),
            path = spec.path,
            size,
            max_read = session.max_read,
            max_write = session.max_write,
            "opened image on SMB share"
        );
        Ok(SmbFile {
            server,
            spec,
            size,
            identity,
            open: Mutex::new(Some(Arc::new(Open { session, file_id }))),
            reopen: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            section_len,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The handle, if it belongs to the live session.
    fn current(&self) -> Option<Arc<Open>> {
        lock(&self.open)
            .as_ref()
            .filter(|o| self.server.is_current(o.session.generation) && o.session.is_alive())
            .cloned()
    }

    /// The handle on the live session, reopening the image after a reconnect.
    async fn handle(&self) -> Result<Arc<Open>> {
        if let Some(open) = self.current() {
            return Ok(open);
        }
        let _one_reopen = self.reopen.lock().await;
        if let Some(open) = self.current() {
            return Ok(open);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Io,
                "the image was closed (the disk stopped)",
            ));
        }
        let session = self.server.session().await?;
        let spec = ImageSpec {
            create_size: None,
            ..self.spec.clone()
        };
        let (file_id, size, identity) = open_image(&session, &spec)
            .await
            .map_err(|e| e.within("reopen after reconnect"))?;
        if identity != self.identity {
            close(&session, file_id).await;
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "reopen after reconnect: {} is another file now ({identity}, was {}); \
                     refusing it: put the image back at its path or restart the disk",
                    self.spec.path, self.identity
                ),
            ));
        }
        if size != self.size {
            tracing::warn!(
                path = self.spec.path,
                was = self.size,
                now = size,
                "image size changed while disconnected; the disk keeps its size"
            );
        }
        tracing::info!(path = self.spec.path, "reopened image");
        let open = Arc::new(Open { session, file_id });
        *lock(&self.open) = Some(open.clone());
        Ok(open)
    }

    /// Sends one request on the image's handle, charging credits for `payload` bytes.
    /// A lost connection or handle is noted so the next request reconnects or reopens.
    async fn call<R: Pack + Sync>(
        &self,
        command: Command,
        payload: usize,
        what: &str,
        build: impl FnOnce(FileId) -> R,
    ) -> Result<Frame> {
        let open = self.handle().await?;
        let req = build(open.file_id);
        let charge = CreditCharge(charge(payload) as u16);
        let s = &open.session;
        match s
            .conn
            .execute_with_credits(command, &req, Some(s.tree.tree_id), charge)
            .await
        {
            Ok(frame) => {
                if handle_gone(frame.header.status) {
                    let mut slot = lock(&self.open);
                    if slot.as_ref().is_some_and(|o| Arc::ptr_eq(o, &open)) {
                        *slot = None;
                    }
                }
                Ok(frame)
            }
            Err(e) => {
                if e.kind() == smb2::ErrorKind::ConnectionLost || !s.is_alive() {
                    self.server.lost(s.generation).await;
                }
                Err(smb_error(what, e))
            }
        }
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        // A read-only handle has nothing to flush, and servers refuse FLUSH on it.
        if self.spec.read_only {
            return Ok(());
        }
        let frame = self
            .call(Command::Flush, 0, "flush", |file_id| FlushRequest {
                file_id,
            })
            .await?;
        match frame.header.status {
            NtStatus::SUCCESS => Ok(()),
            status => Err(status_error("flush", status)),
        }
    }

    /// Makes `[offset, offset + len)` read as zeros with FSCTL_SET_ZERO_DATA. Returns
    /// `Unsupported` when the server refuses it, so the caller can write zeros instead.
    pub(crate) async fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let mut input = Vec::with_capacity(16);
        input.extend_from_slice(&offset.to_le_bytes());
        input.extend_from_slice(&(offset + len).to_le_bytes());
        let frame = self
            .call(Command::Ioctl, 16, "set zero data", |file_id| {
                IoctlRequest {
                    ctl_code: FSCTL_SET_ZERO_DATA,
                    file_id,
                    max_input_response: 0,
                    max_output_response: 0,
                    flags: SMB2_0_IOCTL_IS_FSCTL,
                    input_data: input,
                }
            })
            .await?;
        match frame.header.status {
            NtStatus::SUCCESS => Ok(()),
            NtStatus::NOT_SUPPORTED | NtStatus::INVALID_DEVICE_REQUEST => Err(Error::new(
                ErrorKind::Unsupported,
                "server refused FSCTL_SET_ZERO_DATA",
            )),
            status => Err(status_error("set zero data", status)),
        }
    }
}

impl SmbFile {
    /// Closes the handle and waits for the server's answer, so that the image is free for
    /// the next user (share modes) when this returns. The file is never reopened.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _one_reopen = self.reopen.lock().await;
        let Some(open) = lock(&self.open).take() else {
            return;
        };
        close(&open.session, open.file_id).await;
    }
}

impl Drop for SmbFile {
    fn drop(&mut self) {
        self.server.leave();
        if let Some(open) = lock(&self.open).take() {
            // Best effort: the server closes the handle with the session anyway.
            self.runtime
                .spawn(async move { close(&open.session, open.file_id).await });
        }
    }
}

/// The data of a READ reply body (MS-SMB2 2.2.20), left in place: StructureSize (17),
/// DataOffset (from the start of the 64-byte header), Reserved, DataLength, ... A reply whose
/// fields point outside the frame or carry more than was asked for is refused.
pub(crate) fn read_payload(body: Vec<u8>, asked: usize) -> Result<SectionData> {
    const HEADER: usize = 64;
    const FIXED: usize = 16;
    let malformed = |why: &str| Error::new(ErrorKind::Io, format!("malformed read reply: {why}"));
    if body.len() < FIXED || u16::from_le_bytes([body[0], body[1]]) != 17 {
        return Err(malformed("bad structure size"));
    }
    let offset = usize::from(body[2]);
    let len = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
    if len == 0 {
        return Ok(Vec::new().into());
    }
    if len > asked {
        return Err(malformed(&format!("{len} bytes for a read of {asked}")));
    }
    let start = offset
        .checked_sub(HEADER)
        .filter(|&s| s >= FIXED)
        .ok_or_else(|| malformed(&format!("data offset {offset}")))?;
    let end = start + len;
    let body_len = body.len();
    SectionData::slice(body, start..end).ok_or_else(|| {
        malformed(&format!(
            "data {start}..{end} beyond the {body_len}-byte body"
        ))
    })
}

#[async_trait]
impl SectionIo for SmbFile {
    fn max_section_len(&self) -> usize {
        self.current()
            .map_or(CREDIT_UNIT, |o| o.session.max_section())
    }

    /// Sections this disk may start now: what is left of its share of the connection's
    /// credits, in sections of the size the pipeline cuts.
    fn credits(&self) -> usize {
        let Some(open) = self.current() else {
            return 1;
        };
        let share = self.server.credit_share(&open.session);
        let left = share.saturating_sub(self.in_flight.load(Ordering::Relaxed));
        let max = open.session.max_section();
        let section = self.section_len.map_or(max, |l| l.min(max));
        (left / charge(section)).max(1)
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<SectionData> {
        let _counted = Outstanding::new(self, len);
        let frame = self
            .call(Command::Read, len, "read", |file_id| ReadRequest {
                padding: 0x50,
                flags: 0,
                length: len as u32,
                offset,
                file_id,
                minimum_count: 0,
                channel: 0,
                remaining_bytes: 0,
                read_channel_info: vec![],
            })
            .await?;
        if frame.header.status == NtStatus::END_OF_FILE {
            return Ok(Vec::new().into());
        }
        if frame.header.status != NtStatus::SUCCESS {
            return Err(status_error("read", frame.header.status));
        }
        read_payload(frame.body, len)
    }

    async fn write_at(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        let len = data.len();
        let _counted = Outstanding::new(self, len);
        let frame = self
            .call(Command::Write, len, "write", |file_id| WriteRequest {
                data_offset: 0x70,
                offset,
                file_id,
                channel: 0,
                remaining_bytes: 0,
                write_channel_info_offset: 0,
                write_channel_info_length: 0,
                flags: 0,
                data,
            })
            .await?;
        if frame.header.status != NtStatus::SUCCESS {
            return Err(status_error("write", frame.header.status));
        }
        let resp = WriteResponse::unpack(&mut ReadCursor::new(&frame.body))
            .map_err(|e| smb_error("write reply", e))?;
        if resp.count as usize != len {
            return Err(Error::new(
                ErrorKind::Io,
                format!("short write: {} of {len} bytes", resp.count),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::read_payload;

    fn reply(offset: u8, len: u32, data: &[u8]) -> Vec<u8> {
        let mut b = vec![17, 0, offset, 0];
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn read_payload_is_taken_in_place() {
        let d = read_payload(reply(0x50, 3, b"abc"), 4096).unwrap();
        assert_eq!(d.as_slice(), b"abc");
        assert!(read_payload(reply(0x50, 0, b""), 4096)
            .unwrap()
            .as_slice()
            .is_empty());
    }

    #[test]
    fn broken_read_replies_are_refused() {
        for (body, why) in [
            (vec![17, 0, 0x50], "bad structure size"),
            (reply(0x50, 4, b"abc"), "beyond"),
            (reply(0x10, 3, b"abc"), "data offset 16"),
            (
                reply(0x50, 8192, &[0; 8192]),
                "8192 bytes for a read of 4096",
            ),
        ] {
            let e = read_payload(body, 4096).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
