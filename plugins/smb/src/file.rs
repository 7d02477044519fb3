//! One open image on an SMB share: the connection, the tree and the handle, and the section
//! operations the pipeline engine issues on them.

use async_trait::async_trait;
use smb2::client::connection::Connection;
use smb2::client::tree::Tree;
use smb2::msg::flush::FlushRequest;
use smb2::msg::ioctl::IoctlRequest;
use smb2::msg::query_info::InfoType;
use smb2::msg::read::{ReadRequest, ReadResponse};
use smb2::msg::set_info::SetInfoRequest;
use smb2::msg::write::{WriteRequest, WriteResponse};
use smb2::pack::{Pack, ReadCursor, Unpack};
use smb2::types::status::NtStatus;
use smb2::types::{Command, CreditCharge, FileId};
use smb2::{ClientConfig, SmbClient};
use twinpath_core::{Error, ErrorKind, Result};
use twinpath_pipeline::SectionIo;

/// MS-FSCC 2.4.14 FileEndOfFileInformation.
const FILE_END_OF_FILE_INFORMATION: u8 = 20;
/// MS-FSCC 2.3.85: zero a byte range (the server may deallocate it).
const FSCTL_SET_ZERO_DATA: u32 = 0x0009_80c8;
/// MS-SMB2 2.2.31: the ioctl is an FSCTL.
const SMB2_0_IOCTL_IS_FSCTL: u32 = 1;
/// One credit pays for 64 KiB of payload (MS-SMB2 3.1.5.2).
const CREDIT_UNIT: usize = 65536;

pub(crate) struct SmbFile {
    // Owns the session; `conn` is a clone sharing its transport and credits.
    _client: SmbClient,
    conn: Connection,
    tree: Tree,
    file_id: FileId,
    size: u64,
    max_read: usize,
    max_write: usize,
}

fn smb_error(what: &str, e: smb2::Error) -> Error {
    let kind = match e.kind() {
        smb2::ErrorKind::NotFound => ErrorKind::NotFound,
        smb2::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Io,
    };
    Error::with_source(kind, what.to_owned(), e)
}

fn status_error(what: &str, status: NtStatus) -> Error {
    let kind = if status == NtStatus::OBJECT_NAME_NOT_FOUND {
        ErrorKind::NotFound
    } else {
        ErrorKind::Io
    };
    Error::new(kind, format!("{what}: server answered {status:?}"))
}

impl SmbFile {
    pub(crate) async fn open(
        server: &str,
        share: &str,
        path: &str,
        user: &str,
        password: &str,
        create_size: Option<u64>,
        read_only: bool,
    ) -> Result<SmbFile> {
        let config = ClientConfig {
            addr: server.to_owned(),
            username: user.to_owned(),
            password: password.to_owned(),
            ..ClientConfig::default()
        };
        let mut client = SmbClient::connect(config)
            .await
            .map_err(|e| smb_error("connect and log in", e))?;
        let tree = client
            .connect_share(share)
            .await
            .map_err(|e| smb_error(&format!("share `{share}`"), e))?;
        let mut conn = client
            .connection_for(&tree)
            .map_err(|e| smb_error("connection", e))?;
        let exists = match tree.stat(&mut conn, path).await {
            Ok(_) => true,
            Err(e) if e.kind() == smb2::ErrorKind::NotFound => false,
            Err(e) => return Err(smb_error("stat", e)),
        };
        if !exists && create_size.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                "image does not exist (set create_size to create it)",
            ));
        }
        let opened = if read_only {
            tree.open_file(&mut conn, path).await
        } else {
            tree.open_file_readwrite(&mut conn, path).await
        };
        let (file_id, mut size) = opened.map_err(|e| smb_error("open", e))?;
        if let (false, Some(create)) = (exists, create_size) {
            let req = SetInfoRequest {
                info_type: InfoType::File,
                file_info_class: FILE_END_OF_FILE_INFORMATION,
                additional_information: 0,
                file_id,
                buffer: create.to_le_bytes().to_vec(),
            };
            let frame = conn
                .execute(Command::SetInfo, &req, Some(tree.tree_id))
                .await
                .map_err(|e| smb_error("set size", e))?;
            if frame.header.status != NtStatus::SUCCESS {
                return Err(status_error("set size", frame.header.status));
            }
            size = create;
            tracing::info!(path, size, "created image on the share");
        }
        let params = conn.params();
        let max_read = params
            .as_ref()
            .map_or(CREDIT_UNIT, |p| p.max_read_size as usize);
        let max_write = params
            .as_ref()
            .map_or(CREDIT_UNIT, |p| p.max_write_size as usize);
        tracing::info!(
            server,
            share,
            path,
            size,
            max_read,
            max_write,
            "opened image on SMB share"
        );
        Ok(SmbFile {
            _client: client,
            conn,
            tree,
            file_id,
            size,
            max_read,
            max_write,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        let req = FlushRequest {
            file_id: self.file_id,
        };
        self.call(Command::Flush, &req, 0, "flush")
            .await
            .map(|_| ())
    }

    /// Makes `[offset, offset + len)` read as zeros with FSCTL_SET_ZERO_DATA. Returns
    /// `Unsupported` when the server refuses it, so the caller can write zeros instead.
    pub(crate) async fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let mut input = Vec::with_capacity(16);
        input.extend_from_slice(&offset.to_le_bytes());
        input.extend_from_slice(&(offset + len).to_le_bytes());
        let req = IoctlRequest {
            ctl_code: FSCTL_SET_ZERO_DATA,
            file_id: self.file_id,
            max_input_response: 0,
            max_output_response: 0,
            flags: SMB2_0_IOCTL_IS_FSCTL,
            input_data: input,
        };
        let frame = self.call(Command::Ioctl, &req, 16, "set zero data").await?;
        match frame.header.status {
            NtStatus::SUCCESS => Ok(()),
            NtStatus::NOT_SUPPORTED | NtStatus::INVALID_DEVICE_REQUEST => Err(Error::new(
                ErrorKind::Unsupported,
                "server refused FSCTL_SET_ZERO_DATA",
            )),
            status => Err(status_error("set zero data", status)),
        }
    }

    async fn call(
        &self,
        command: Command,
        body: &dyn Pack,
        payload: usize,
        what: &str,
    ) -> Result<smb2::client::connection::Frame> {
        let charge = CreditCharge(payload.div_ceil(CREDIT_UNIT).max(1) as u16);
        let frame = self
            .conn
            .execute_with_credits(command, body, Some(self.tree.tree_id), charge)
            .await
            .map_err(|e| smb_error(what, e))?;
        Ok(frame)
    }
}

#[async_trait]
impl SectionIo for SmbFile {
    fn max_section_len(&self) -> usize {
        self.max_read.min(self.max_write)
    }

    fn credits(&self) -> usize {
        usize::from(self.conn.credits())
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let req = ReadRequest {
            padding: 0x50,
            flags: 0,
            length: len as u32,
            offset,
            file_id: self.file_id,
            minimum_count: 0,
            channel: 0,
            remaining_bytes: 0,
            read_channel_info: vec![],
        };
        let frame = self.call(Command::Read, &req, len, "read").await?;
        if frame.header.status == NtStatus::END_OF_FILE {
            return Ok(Vec::new());
        }
        if frame.header.status != NtStatus::SUCCESS {
            return Err(status_error("read", frame.header.status));
        }
        let resp = ReadResponse::unpack(&mut ReadCursor::new(&frame.body))
            .map_err(|e| smb_error("read reply", e))?;
        Ok(resp.data)
    }

    async fn write_at(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        let len = data.len();
        let req = WriteRequest {
            data_offset: 0x70,
            offset,
            file_id: self.file_id,
            channel: 0,
            remaining_bytes: 0,
            write_channel_info_offset: 0,
            write_channel_info_length: 0,
            flags: 0,
            data,
        };
        let frame = self.call(Command::Write, &req, len, "write").await?;
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
