//! What the server and a model worker say to each other over their socket: frames of a 4-byte
//! length and a JSON message, some followed by raw bytes the message counts, some carrying a
//! file descriptor (a shared memory region). Tensors travel in shared memory; the frames only
//! say where they lie.
//!
//! The server reads the worker's frames as untrusted input: a frame's length and every slot a
//! reply names are bounded and checked before anything is read or allocated for them.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::model::tensor::{DType, HostTensor};

/// The longest message frame either side reads (its JSON, not the bytes that may follow it).
pub(super) const MAX_FRAME_BYTES: usize = 1 << 20;
/// Descriptors received and not yet taken: a region message carries one.
const MAX_PENDING_FDS: usize = 8;

/// From the server to the worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Request {
    /// The frame carries a shared memory region of `len` bytes: from now on the batch inputs
    /// (or the outputs) go there. The old one is unmapped.
    Region { which: Which, len: usize },
    Load(Load),
    /// Run `forward` on these tensors (in the inputs region).
    Forward { inputs: Vec<Slot> },
}

/// Load the model whose TorchScript (`bytes` long) follows this frame, onto `device`, after
/// confining the process. `probe` (in the inputs region) is what a reduced-precision load checks
/// itself with.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Load {
    pub(super) model: String,
    pub(super) device: String,
    pub(super) precision: String,
    pub(super) channels_last: bool,
    pub(super) threads: u32,
    pub(super) outputs: usize,
    pub(super) probe: Vec<Slot>,
    pub(super) bytes: u64,
    /// Address space the worker may map once confined, beyond what it has mapped then.
    pub(super) memory_bytes: u64,
}

/// From the worker to the server.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Reply {
    Loaded {
        weight_bytes: u64,
        parameters: u64,
        /// Landlock and seccomp are both in place.
        complete: bool,
        /// What the confinement put in place, in words.
        confinement: String,
    },
    /// The load or the pass failed. `fatal`: the worker cannot go on (a CUDA device-side assert
    /// poisons its context) and exits after this reply.
    Failed { kind: FailureKind, reason: String, fatal: bool },
    /// The outputs, in the outputs region; or, when they did not fit (`inline`), in the bytes
    /// that follow this frame, at the slots' offsets.
    Outputs { outputs: Vec<Slot>, inline: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Which {
    Inputs,
    Outputs,
}

/// Which [`BackendError`](super::super::BackendError) a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum FailureKind {
    Device,
    Load,
    Forward,
    Output,
}

/// Where one tensor lies: its type and shape, and its first byte's offset in a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Slot {
    pub(super) dtype: String,
    pub(super) shape: Vec<u32>,
    pub(super) offset: usize,
}

/// Offsets of tensors laid out one after another are aligned to this (a cache line).
pub(super) const ALIGN: usize = 64;

pub(super) fn align(n: usize) -> usize {
    n.div_ceil(ALIGN).saturating_mul(ALIGN)
}

impl Slot {
    /// The slot's dtype and byte length, checked: a known dtype and a size that does not
    /// overflow.
    pub(super) fn extent(&self) -> io::Result<(DType, usize)> {
        let dtype = DType::from_wire_name(&self.dtype).ok_or_else(|| invalid(format!("'{}' is not a dtype", self.dtype)))?;
        let bytes = self
            .shape
            .iter()
            .try_fold(dtype.size(), |n, &d| n.checked_mul(d as usize))
            .ok_or_else(|| invalid(format!("shape {:?} is too large", self.shape)))?;
        Ok((dtype, bytes))
    }
}

/// Lays `tensors` out one after another from offset 0: their slots, and the bytes needed.
pub(super) fn layout<'a>(tensors: impl IntoIterator<Item = (DType, &'a [u32])>) -> (Vec<Slot>, usize) {
    let mut end = 0usize;
    let slots = tensors
        .into_iter()
        .map(|(dtype, shape)| {
            let offset = align(end);
            let bytes = shape.iter().fold(dtype.size(), |n, &d| n.saturating_mul(d as usize));
            end = offset.saturating_add(bytes);
            Slot { dtype: dtype.wire_name().to_owned(), shape: shape.to_vec(), offset }
        })
        .collect();
    (slots, end)
}

/// The bytes `tensors` take laid out by [`layout`].
pub(super) fn layout_bytes(tensors: &[HostTensor]) -> usize {
    layout(tensors.iter().map(|t| (t.dtype, t.shape.as_slice()))).1
}

pub(super) fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// One end of the socket, with what has been read past the last frame and the descriptors that
/// came with it.
#[derive(Debug)]
pub(super) struct Channel {
    socket: UnixStream,
    /// Whether descriptors may come with frames (the worker's side: regions). The server's side
    /// takes none: the kernel closes any a worker sends, and the frame is a protocol break.
    takes_fds: bool,
    buffered: VecDeque<u8>,
    fds: VecDeque<OwnedFd>,
    /// When the current read must be done by, if it must.
    deadline: Option<Instant>,
}

impl Channel {
    /// The server's end: descriptors sent to it are refused.
    pub(super) fn new(socket: UnixStream) -> Channel {
        Channel { socket, takes_fds: false, buffered: VecDeque::new(), fds: VecDeque::new(), deadline: None }
    }

    /// The worker's end: it is handed its regions' descriptors.
    pub(super) fn taking_fds(socket: UnixStream) -> Channel {
        Channel { takes_fds: true, ..Channel::new(socket) }
    }

    /// Reads from now on fail with `TimedOut` once `deadline` passes (`None`: wait for ever).
    pub(super) fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Sends `message`, then `payload`, with `fd` attached to the frame's first byte.
    pub(super) fn send(&mut self, message: &impl Serialize, payload: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        // A peer that stops reading cannot hold the sender past the deadline.
        let left = match self.deadline {
            Some(deadline) => match deadline.saturating_duration_since(Instant::now()) {
                left if left.is_zero() => return Err(io::Error::new(io::ErrorKind::TimedOut, "no time left to send")),
                left => Some(left),
            },
            None => None,
        };
        self.socket.set_write_timeout(left)?;
        self.write_frame(message, payload, fd).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::Error::new(io::ErrorKind::TimedOut, "the other side stopped reading"),
            _ => e,
        })
    }

    fn write_frame(&mut self, message: &impl Serialize, payload: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let json = serde_json::to_vec(message).map_err(|e| invalid(format!("cannot encode a message: {e}")))?;
        let header = u32::try_from(json.len()).map_err(|_| invalid("a message too long to send".to_owned()))?.to_le_bytes();
        let mut sent = 0;
        if let Some(fd) = fd {
            let fds = [fd];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("no room for a descriptor in the message"));
            }
            sent = loop {
                match rustix::net::sendmsg(&self.socket, &[IoSlice::new(&header), IoSlice::new(&json)], &mut control, SendFlags::NOSIGNAL) {
                    Err(rustix::io::Errno::INTR) => continue,
                    other => break other?,
                }
            };
        }
        let mut frame = header.to_vec();
        frame.extend_from_slice(&json);
        if sent < frame.len() {
            self.socket.write_all(&frame[sent..])?;
        }
        self.socket.write_all(payload)
    }

    /// Reads the next message.
    pub(super) fn receive<T: DeserializeOwned>(&mut self) -> io::Result<T> {
        let mut header = [0u8; 4];
        self.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(invalid(format!("a message of {len} bytes, more than the {MAX_FRAME_BYTES} allowed")));
        }
        let mut json = vec![0u8; len];
        self.read_exact(&mut json)?;
        serde_json::from_slice(&json).map_err(|e| invalid(format!("a message that does not parse: {e}")))
    }

    /// The descriptor that came with the frames read so far, oldest first.
    pub(super) fn take_fd(&mut self) -> io::Result<OwnedFd> {
        self.fds.pop_front().ok_or_else(|| invalid("a region message came without its descriptor".to_owned()))
    }

    /// Fills `out` from the socket.
    pub(super) fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut filled = 0;
        while filled < out.len() {
            if self.buffered.is_empty() {
                self.fill()?;
            }
            let n = (out.len() - filled).min(self.buffered.len());
            for (slot, byte) in out[filled..filled + n].iter_mut().zip(self.buffered.drain(..n)) {
                *slot = byte;
            }
            filled += n;
        }
        Ok(())
    }

    fn fill(&mut self) -> io::Result<()> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
            }
            self.socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        } else {
            self.socket.set_read_timeout(None)?;
        }
        let mut chunk = [0u8; 64 << 10];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let room = if self.takes_fds { space.len() } else { 0 };
        let mut control = RecvAncillaryBuffer::new(&mut space[..room]);
        let received = loop {
            match rustix::net::recvmsg(&self.socket, &mut [IoSliceMut::new(&mut chunk)], &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(received) => break received,
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")),
                Err(e) => return Err(e.into()),
            }
        };
        if received.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(invalid("descriptors sent where none are taken".to_owned()));
        }
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                self.fds.extend(fds);
                if self.fds.len() > MAX_PENDING_FDS {
                    return Err(invalid(format!("more than {MAX_PENDING_FDS} descriptors waiting")));
                }
            }
        }
        if received.bytes == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other side closed the socket"));
        }
        self.buffered.extend(&chunk[..received.bytes]);
        Ok(())
    }

    /// Closes both directions: a worker reading its next request sees the end.
    pub(super) fn hang_up(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_payloads_and_descriptors_arrive_in_order() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (mut a, mut b) = (Channel::new(a), Channel::taking_fds(b));
        let region = kiln_torchscan::shm::Region::create("kiln-test", 128).expect("region");
        a.send(&Request::Region { which: Which::Inputs, len: 128 }, &[], Some(region.fd())).expect("send");
        a.send(&Request::Forward { inputs: vec![] }, b"tail", None).expect("send");
        let Request::Region { which, len } = b.receive().expect("region") else { panic!("not a region") };
        assert_eq!((which, len), (Which::Inputs, 128));
        let fd = b.take_fd().expect("fd");
        kiln_torchscan::shm::Region::map(fd, 128).expect("maps").write(0, b"x").expect("write");
        assert!(matches!(b.receive().expect("forward"), Request::Forward { .. }));
        let mut tail = [0u8; 4];
        b.read_exact(&mut tail).expect("payload");
        assert_eq!(&tail, b"tail");
        let mut back = [0u8; 1];
        region.read(0, &mut back).expect("read");
        assert_eq!(&back, b"x");
    }

    #[test]
    fn the_server_s_end_refuses_descriptors() {
        let (worker, server) = UnixStream::pair().expect("pair");
        let (mut worker, mut server) = (Channel::taking_fds(worker), Channel::new(server));
        let region = kiln_torchscan::shm::Region::create("kiln-test", 16).expect("region");
        worker.send(&Reply::Outputs { outputs: vec![], inline: false }, &[], Some(region.fd())).expect("send");
        assert_eq!(server.receive::<Reply>().expect_err("refused").kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn oversized_frames_silence_and_hang_ups_are_errors() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut b = Channel::new(b);
        (&a).write_all(&u32::MAX.to_le_bytes()).expect("write");
        assert_eq!(b.receive::<Reply>().expect_err("too long").kind(), io::ErrorKind::InvalidData);
        b.set_deadline(Some(Instant::now() + Duration::from_millis(20)));
        assert_eq!(b.receive::<Reply>().expect_err("silent").kind(), io::ErrorKind::TimedOut);
        drop(a);
        b.set_deadline(None);
        assert_eq!(b.receive::<Reply>().expect_err("closed").kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn slots_are_checked_and_laid_out_aligned() {
        let (slots, end) = layout([(DType::F32, &[2u32, 3][..]), (DType::U8, &[5][..])]);
        assert_eq!(slots[1].offset, 64);
        assert_eq!(end, 69);
        assert_eq!(slots[0].extent().expect("ok"), (DType::F32, 24));
        let huge = Slot { dtype: "FP32".into(), shape: vec![u32::MAX, u32::MAX, u32::MAX], offset: 0 };
        assert!(huge.extent().is_err());
        assert!(Slot { dtype: "NOPE".into(), shape: vec![], offset: 0 }.extent().is_err());
    }
}
