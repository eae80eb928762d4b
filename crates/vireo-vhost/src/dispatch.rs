//! The vhost-user message loop, owned by Vireo: receiving a message (header, payload, file
//! descriptors), checking its size and descriptors against what the request takes, handing it to
//! the connection's [`VhostUserBackend`], and replying (the request's own reply, or REPLY_ACK's
//! status word).
//!
//! Why not rust-vmm `vhost`'s `BackendReqHandler`: it answers IOTLB_MSG, SET_STATUS and
//! GET_STATUS as invalid messages, and it cannot be told to wait on anything but its socket. The
//! message definitions stay the crate's (`vhost::vhost_user::message`), and so do the handler
//! methods Vireo implements (`VhostUserBackendReqHandlerMut`); only the loop is ours.
//!
//! Every request's payload size is checked exactly and its file descriptors counted before
//! anything is decoded; a request whose own reply cannot be given (a refused GET_*) ends the
//! connection, since the frontend would otherwise wait for ever; other refusals are reported
//! through REPLY_ACK when the frontend asked for it.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{
    FrontendReq, VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::backend::VhostUserBackend;

use vireo_wire::header::{NEED_REPLY as FLAG_NEED_REPLY, SIZE as HEADER};
use vireo_wire::Header;

/// The largest payload any request Vireo handles carries (SET_MEM_TABLE with 8 regions is 264
/// bytes, GET/SET_CONFIG at most 12 + 256); anything larger is a broken frontend.
const MAX_PAYLOAD: usize = 4096;
/// At most this many descriptors come with one message (SET_MEM_TABLE's 8 regions).
const MAX_FDS: usize = 8;
/// SET_VRING_KICK/CALL/ERR: bits 0-7 the queue, bit 8 "no file descriptor".
const VRING_INDEX_MASK: u64 = 0xff;
const VRING_NOFD: u64 = 0x100;
const MEMORY_REGIONS_MAX: usize = 8;
const CONFIG_MAX: usize = 256;
/// SET_DEVICE_STATE_FD's reply: bit 8 says no descriptor is returned.
const NO_FD: u64 = 0x100;

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The frontend closed the socket.
    #[error("the frontend disconnected")]
    Disconnected,
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// A header that cannot be a vhost-user request.
    #[error("malformed header: {0}")]
    Header(&'static str),
    /// A request whose reply the frontend waits for could not be answered.
    #[error("request {code} refused and it has no way to say so: {why}")]
    Unanswerable {
        /// The request code.
        code: u32,
        /// Why it was refused.
        why: String,
    },
}

/// One received request.
#[derive(Debug)]
pub struct Message {
    /// The request code.
    pub code: u32,
    /// The header's flags.
    pub flags: u32,
    /// The payload, exactly as long as the header said.
    pub payload: Vec<u8>,
    /// The descriptors that came with it.
    pub files: Vec<File>,
}

/// What to send back.
#[derive(Debug, Default)]
pub struct Reply {
    payload: Vec<u8>,
    files: Vec<File>,
}

impl Reply {
    fn u64(v: u64) -> Self {
        Self { payload: v.to_le_bytes().to_vec(), files: Vec::new() }
    }
}

/// Reads one message; `Ok(None)` at a clean end of stream between messages.
pub fn recv_message(sock: &UnixStream) -> Result<Option<Message>, ProtocolError> {
    let mut hdr = [0u8; HEADER];
    let mut raw_fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: HEADER }];
    // SAFETY: the iovec names `hdr`, which outlives the call; the descriptor array is ours.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| ProtocolError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: the kernel just installed these `nfds` descriptors in this process for us; each
    // is owned by exactly one File from here on (closed if the message is refused).
    let files: Vec<File> = raw_fds[..nfds].iter().map(|&fd| unsafe { File::from_raw_fd(fd) }).collect();
    if n == 0 {
        return Ok(None);
    }
    if n < HEADER {
        read_exact(sock, &mut hdr[n..])?;
    }
    let h = Header::decode(&hdr);
    if !h.is_request() {
        return Err(ProtocolError::Header("version must be 1 and the reply flag clear"));
    }
    let (code, flags, size) = (h.code, h.flags, h.size);
    let size = usize::try_from(size).map_err(|_| ProtocolError::Header("size"))?;
    if size > MAX_PAYLOAD {
        return Err(ProtocolError::Header("payload larger than any request"));
    }
    let mut payload = vec![0u8; size];
    read_exact(sock, &mut payload)?;
    Ok(Some(Message { code, flags, payload, files }))
}

fn read_exact(mut sock: &UnixStream, buf: &mut [u8]) -> Result<(), ProtocolError> {
    std::io::Read::read_exact(&mut sock, buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Disconnected,
        _ => ProtocolError::Io(e),
    })
}

/// Sends `reply` to request `code`.
pub fn send_reply(sock: &UnixStream, code: u32, reply: &Reply) -> Result<(), ProtocolError> {
    let size = u32::try_from(reply.payload.len()).map_err(|_| ProtocolError::Header("reply size"))?;
    let hdr = Header::reply(code, size).encode();
    let fds: Vec<RawFd> = reply.files.iter().map(AsRawFd::as_raw_fd).collect();
    let bufs = [IoSlice::new(&hdr), IoSlice::new(&reply.payload)];
    let total = HEADER + reply.payload.len();
    let sent = sock
        .send_with_fds(&[&bufs[0][..], &bufs[1][..]], &fds)
        .map_err(|e| ProtocolError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    if sent < total {
        // The descriptors went with the first part; the rest is plain bytes.
        let mut all = hdr.to_vec();
        all.extend_from_slice(&reply.payload);
        (&*sock).write_all(&all[sent..])?;
    }
    Ok(())
}

/// Why one request was refused (the connection goes on).
#[derive(Debug)]
struct Refusal(String);

impl<E: std::fmt::Display> From<E> for Refusal {
    fn from(e: E) -> Self {
        Refusal(e.to_string())
    }
}

fn refuse(what: &str) -> Refusal {
    Refusal(what.to_string())
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&p[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(b)
}

fn want_size(msg: &Message, size: usize) -> Result<(), Refusal> {
    if msg.payload.len() == size {
        Ok(())
    } else {
        Err(Refusal(format!("payload of {} bytes, the request takes {size}", msg.payload.len())))
    }
}

fn want_fds(msg: &Message, n: usize) -> Result<(), Refusal> {
    if msg.files.len() == n {
        Ok(())
    } else {
        Err(Refusal(format!("{} file descriptors, the request takes {n}", msg.files.len())))
    }
}

fn one_file(msg: &mut Message) -> Result<File, Refusal> {
    want_fds(msg, 1)?;
    msg.files.pop().ok_or_else(|| refuse("file descriptor"))
}

/// Requests whose reply is their answer (the frontend waits for it in any case).
fn has_reply(code: u32) -> bool {
    [
        FrontendReq::GET_FEATURES,
        FrontendReq::GET_PROTOCOL_FEATURES,
        FrontendReq::GET_VRING_BASE,
        FrontendReq::GET_QUEUE_NUM,
        FrontendReq::GET_CONFIG,
        FrontendReq::GET_INFLIGHT_FD,
        FrontendReq::GET_MAX_MEM_SLOTS,
        FrontendReq::GET_STATUS,
        FrontendReq::SET_LOG_BASE,
    ]
    .iter()
    .any(|&r| r as u32 == code)
}

/// Handles one request against `backend`; returns what to send back (nothing, the request's
/// reply, or a REPLY_ACK status word), or the error that ends the connection.
pub fn handle_message(backend: &mut VhostUserBackend, mut msg: Message) -> Result<Option<Reply>, ProtocolError> {
    let code = msg.code;
    tracing::trace!(code, size = msg.payload.len(), fds = msg.files.len(), "request");
    let need_ack = msg.flags & FLAG_NEED_REPLY != 0
        && backend.acked_protocol_features() & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
    match dispatch(backend, &mut msg) {
        Ok(Some(reply)) => Ok(Some(reply)),
        Ok(None) if need_ack => Ok(Some(Reply::u64(0))),
        Ok(None) => Ok(None),
        Err(Refusal(why)) => {
            tracing::warn!(request = code, why, "vhost-user request refused");
            if code == FrontendReq::IOTLB_MSG as u32 || code == FrontendReq::CHECK_DEVICE_STATE as u32 {
                // Their reply is a status word: a refusal is a non-zero one.
                Ok(Some(Reply::u64(1)))
            } else if code == FrontendReq::SET_DEVICE_STATE_FD as u32 {
                // An error, and (bit 8) no descriptor.
                Ok(Some(Reply::u64(NO_FD | 1)))
            } else if has_reply(code) {
                Err(ProtocolError::Unanswerable { code, why })
            } else if need_ack {
                Ok(Some(Reply::u64(1)))
            } else {
                Ok(None)
            }
        }
    }
}

fn dispatch(b: &mut VhostUserBackend, msg: &mut Message) -> Result<Option<Reply>, Refusal> {
    use FrontendReq as R;
    let code = msg.code;
    let is = |r: R| r as u32 == code;
    // Descriptors only where the request takes them.
    let takes_fds = [
        R::SET_MEM_TABLE,
        R::SET_LOG_BASE,
        R::SET_LOG_FD,
        R::SET_VRING_KICK,
        R::SET_VRING_CALL,
        R::SET_VRING_ERR,
        R::SET_BACKEND_REQ_FD,
        R::SET_INFLIGHT_FD,
        R::ADD_MEM_REG,
        R::REM_MEM_REG,
        R::SET_DEVICE_STATE_FD,
    ]
    .iter()
    .any(|&r| r as u32 == code);
    if !takes_fds {
        want_fds(msg, 0)?;
    }
    let payload = msg.payload.clone();
    let p = &payload[..];
    if is(R::GET_FEATURES) {
        want_size(msg, 0)?;
        return Ok(Some(Reply::u64(b.get_features()?)));
    }
    if is(R::SET_FEATURES) {
        want_size(msg, 8)?;
        b.set_features(u64_at(p, 0))?;
    } else if is(R::SET_OWNER) {
        want_size(msg, 0)?;
        b.set_owner()?;
    } else if is(R::RESET_OWNER) {
        want_size(msg, 0)?;
        b.reset_owner()?;
    } else if is(R::RESET_DEVICE) {
        want_size(msg, 0)?;
        b.reset_device()?;
    } else if is(R::GET_PROTOCOL_FEATURES) {
        want_size(msg, 0)?;
        return Ok(Some(Reply::u64(b.get_protocol_features()?.bits())));
    } else if is(R::SET_PROTOCOL_FEATURES) {
        want_size(msg, 8)?;
        b.set_protocol_features(u64_at(p, 0))?;
    } else if is(R::GET_QUEUE_NUM) {
        want_size(msg, 0)?;
        return Ok(Some(Reply::u64(b.get_queue_num()?)));
    } else if is(R::GET_MAX_MEM_SLOTS) {
        want_size(msg, 0)?;
        return Ok(Some(Reply::u64(b.get_max_mem_slots()?)));
    } else if is(R::SET_MEM_TABLE) {
        if p.len() < 8 {
            return Err(refuse("memory table header"));
        }
        let n = usize::try_from(u32_at(p, 0)).unwrap_or(usize::MAX);
        if n == 0 || n > MEMORY_REGIONS_MAX {
            return Err(refuse("memory table with 0 or more than 8 regions"));
        }
        want_size(msg, 8 + 32 * n)?;
        want_fds(msg, n)?;
        let regions: Vec<VhostUserMemoryRegion> = (0..n)
            .map(|i| {
                let at = 8 + 32 * i;
                VhostUserMemoryRegion::new(u64_at(p, at), u64_at(p, at + 8), u64_at(p, at + 16), u64_at(p, at + 24))
            })
            .collect();
        let files = std::mem::take(&mut msg.files);
        b.set_mem_table(&regions, files, None)?;
    } else if is(R::ADD_MEM_REG) || is(R::REM_MEM_REG) {
        want_size(msg, 40)?;
        let region = VhostUserSingleMemoryRegion::new(u64_at(p, 8), u64_at(p, 16), u64_at(p, 24), u64_at(p, 32));
        if is(R::ADD_MEM_REG) {
            let file = one_file(msg)?;
            b.add_mem_region(&region, file, None)?;
        } else {
            // Some frontends attach the region's descriptor to the removal too; it is not needed.
            if msg.files.len() > 1 {
                return Err(refuse("more than one descriptor with REM_MEM_REG"));
            }
            b.remove_mem_region(&region)?;
        }
    } else if is(R::SET_LOG_BASE) {
        want_size(msg, 16)?;
        let log = VhostUserLog::new(u64_at(p, 0), u64_at(p, 8));
        let file = one_file(msg)?;
        b.set_log_base(&log, file)?;
        // The reply QEMU waits for when LOG_SHMFD is negotiated; rust-vmm's frontend reads the
        // log message back (16 bytes), libvhost-user sends 8: QEMU accepts any size.
        return Ok(Some(Reply { payload, files: Vec::new() }));
    } else if is(R::SET_VRING_NUM) || is(R::SET_VRING_BASE) || is(R::SET_VRING_ENABLE) {
        want_size(msg, 8)?;
        let (index, num) = (u32_at(p, 0), u32_at(p, 4));
        if is(R::SET_VRING_NUM) {
            b.set_vring_num(index, num)?;
        } else if is(R::SET_VRING_BASE) {
            b.set_vring_base(index, num)?;
        } else {
            b.set_vring_enable(index, num != 0)?;
        }
    } else if is(R::GET_VRING_BASE) {
        want_size(msg, 8)?;
        let state = b.get_vring_base(u32_at(p, 0))?;
        let (index, num) = ({ state.index }, { state.num });
        let mut out = index.to_le_bytes().to_vec();
        out.extend_from_slice(&num.to_le_bytes());
        return Ok(Some(Reply { payload: out, files: Vec::new() }));
    } else if is(R::SET_VRING_ADDR) {
        want_size(msg, 40)?;
        let flags = VhostUserVringAddrFlags::from_bits_truncate(u32_at(p, 4));
        b.set_vring_addr(u32_at(p, 0), flags, u64_at(p, 8), u64_at(p, 16), u64_at(p, 24), u64_at(p, 32))?;
    } else if is(R::SET_VRING_KICK) || is(R::SET_VRING_CALL) || is(R::SET_VRING_ERR) {
        want_size(msg, 8)?;
        let v = u64_at(p, 0);
        if v & !(VRING_INDEX_MASK | VRING_NOFD) != 0 {
            return Err(refuse("unknown bits in the vring index"));
        }
        let index = u8::try_from(v & VRING_INDEX_MASK).unwrap_or(u8::MAX);
        let file = if v & VRING_NOFD != 0 {
            want_fds(msg, 0)?;
            None
        } else {
            Some(one_file(msg)?)
        };
        if is(R::SET_VRING_KICK) {
            b.set_vring_kick(index, file)?;
        } else if is(R::SET_VRING_CALL) {
            b.set_vring_call(index, file)?;
        } else {
            b.set_vring_err(index, file)?;
        }
    } else if is(R::GET_CONFIG) {
        if p.len() < 12 {
            return Err(refuse("config header"));
        }
        let (offset, size, flags) = (u32_at(p, 0), u32_at(p, 4), u32_at(p, 8));
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        if len > CONFIG_MAX {
            return Err(refuse("config read larger than 256 bytes"));
        }
        want_size(msg, 12 + len)?;
        let data = b.get_config(offset, size, VhostUserConfigFlags::from_bits_truncate(flags))?;
        let mut out = p[..12].to_vec();
        out.extend_from_slice(&data);
        return Ok(Some(Reply { payload: out, files: Vec::new() }));
    } else if is(R::SET_CONFIG) {
        if p.len() < 12 {
            return Err(refuse("config header"));
        }
        let flags = VhostUserConfigFlags::from_bits_truncate(u32_at(p, 8));
        b.set_config(u32_at(p, 0), &p[12..], flags)?;
    } else if is(R::GET_INFLIGHT_FD) || is(R::SET_INFLIGHT_FD) {
        // 8 + 8 + 2 + 2, padded to 24 by C frontends.
        if !(20..=24).contains(&p.len()) {
            return Err(refuse("inflight message size"));
        }
        let num_queues = u16::from_le_bytes([p[16], p[17]]);
        let queue_size = u16::from_le_bytes([p[18], p[19]]);
        let info = VhostUserInflight::new(u64_at(p, 0), u64_at(p, 8), num_queues, queue_size);
        if is(R::GET_INFLIGHT_FD) {
            let (out, file) = b.get_inflight_fd(&info)?;
            let mut bytes = out.mmap_size.to_le_bytes().to_vec();
            bytes.extend_from_slice(&out.mmap_offset.to_le_bytes());
            bytes.extend_from_slice(&{ out.num_queues }.to_le_bytes());
            bytes.extend_from_slice(&{ out.queue_size }.to_le_bytes());
            bytes.resize(24, 0);
            return Ok(Some(Reply { payload: bytes, files: vec![file] }));
        }
        let file = one_file(msg)?;
        b.set_inflight_fd(&info, file)?;
    } else if is(R::SET_STATUS) {
        want_size(msg, 8)?;
        b.set_status(u64_at(p, 0))?;
    } else if is(R::GET_STATUS) {
        want_size(msg, 0)?;
        return Ok(Some(Reply::u64(b.status())));
    } else if is(R::IOTLB_MSG) {
        want_size(msg, vireo_wire::iotlb::SIZE)?;
        let m = vireo_wire::IotlbMsg::decode(p).ok_or_else(|| refuse("IOTLB message"))?;
        b.iotlb_msg(m.iova, m.size, m.uaddr, m.perm, m.kind)?;
        // The spec wants the status word whether or not NEED_REPLY was set.
        return Ok(Some(Reply::u64(0)));
    } else if is(R::SET_DEVICE_STATE_FD) {
        want_size(msg, 8)?;
        let direction = VhostTransferStateDirection::try_from(u32_at(p, 0))
            .map_err(|_| refuse("unknown device state transfer direction"))?;
        let phase = VhostTransferStatePhase::try_from(u32_at(p, 4))
            .map_err(|_| refuse("unknown device state transfer phase"))?;
        let file = one_file(msg)?;
        match b.set_device_state_fd(direction, phase, file)? {
            // Bit 8: no descriptor of the back-end's own comes back; the front-end's is used.
            None => return Ok(Some(Reply::u64(NO_FD))),
            Some(f) => return Ok(Some(Reply { payload: 0u64.to_le_bytes().to_vec(), files: vec![f] })),
        }
    } else if is(R::CHECK_DEVICE_STATE) {
        want_size(msg, 0)?;
        b.check_device_state()?;
        return Ok(Some(Reply::u64(0)));
    } else if is(R::SET_LOG_FD) {
        want_size(msg, 0)?;
        let file = one_file(msg)?;
        b.set_log_fd(file)?;
    } else if is(R::SET_BACKEND_REQ_FD) {
        want_size(msg, 0)?;
        let file = one_file(msg)?;
        b.set_backend_req_fd(UnixStream::from(std::os::fd::OwnedFd::from(file)));
    } else if is(R::SEND_RARP) {
        // The MAC in the first 6 bytes of a u64.
        want_size(msg, 8)?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&p[..6]);
        b.device_request(crate::DeviceRequest::SendRarp(mac))?;
    } else if is(R::NET_SET_MTU) {
        want_size(msg, 8)?;
        let mtu = u16::try_from(u64_at(p, 0)).map_err(|_| refuse("MTU beyond 65535"))?;
        b.device_request(crate::DeviceRequest::SetMtu(mtu))?;
    } else {
        // Postcopy, GPU, shared objects: not offered, so a conforming frontend does not send
        // them.
        return Err(Refusal(format!("request {code} is not supported")));
    }
    Ok(None)
}
