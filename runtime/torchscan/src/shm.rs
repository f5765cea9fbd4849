//! Shared memory between the server and a model worker: a memfd mapped by both, through which
//! a batch's tensors go without passing through a socket.
//!
//! The server makes a [`Region`], sizes it and hands its descriptor to the worker over their
//! socket; the worker maps the same memory ([`Region::map`]). They take turns: the server writes
//! a batch's inputs and asks, the worker runs the batch and answers, and neither touches the
//! memory while the other's turn lasts. The region is still memory another process can write
//! at any moment, so this side never lends it out as a Rust slice: [`Region::write`] and
//! [`Region::read`] copy, bounds-checked, and [`Region::tensor`] gives libtorch a view whose use
//! the caller keeps within its turn.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// A memfd and this process's mapping of all of it.
#[derive(Debug)]
pub struct Region {
    fd: OwnedFd,
    /// The mapping's start, `None` while the region is empty (nothing to map).
    at: Option<NonNull<u8>>,
    len: usize,
}

// SAFETY: the mapping belongs to this value alone (it is unmapped on drop, and only through
// `&mut self` otherwise); moving it to another thread moves nothing that is tied to one.
unsafe impl Send for Region {}

impl Region {
    /// A new region of `len` bytes, zeroed, that only this process can grow or shrink (a worker
    /// handed it cannot: it is sealed against both once the owner is done sizing it, see
    /// [`Region::seal`]).
    pub fn create(name: &str, len: usize) -> io::Result<Region> {
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        Region::map(fd, len)
    }

    /// Maps `len` bytes of the memory `fd` holds (handed over by the region's owner). Fails if
    /// the memory is shorter than `len`.
    pub fn map(fd: OwnedFd, len: usize) -> io::Result<Region> {
        let size = rustix::fs::fstat(&fd)?.st_size;
        if u64::try_from(size).map_or(true, |size| size < len as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the shared memory holds {size} bytes, fewer than the {len} asked for"),
            ));
        }
        let at = map(&fd, len)?;
        Ok(Region { fd, at, len })
    }

    /// Seals the memory's size for good: neither side can grow or shrink it after (a worker that
    /// could shrink it would make the server's next access fault). A region that needs more room
    /// is replaced by a new one.
    pub fn seal(&self) -> io::Result<()> {
        Ok(rustix::fs::fcntl_add_seals(&self.fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The descriptor, to hand to the other side.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn checked(&self, offset: usize, len: usize) -> io::Result<*mut u8> {
        match (offset.checked_add(len), self.at) {
            (Some(end), Some(at)) if end <= self.len => Ok(at.as_ptr().wrapping_add(offset)),
            (Some(_), _) if len == 0 => Ok(NonNull::dangling().as_ptr()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at offset {offset} do not fit in shared memory of {} bytes", self.len),
            )),
        }
    }

    /// Copies `bytes` into the region at `offset`.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> io::Result<()> {
        let to = self.checked(offset, bytes.len())?;
        // SAFETY: `to..to + bytes.len()` lies inside this mapping (checked above), which lives as
        // long as `self`; `bytes` is ordinary memory of this process, so the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), to, bytes.len()) };
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out of the region.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> io::Result<()> {
        let from = self.checked(offset, out.len())?;
        // SAFETY: as in `write`, the other way round.
        unsafe { std::ptr::copy_nonoverlapping(from, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// A CPU tensor of `kind` and `shape`, contiguous, over the region's bytes at `offset`:
    /// libtorch reads and writes the region itself, no copy.
    ///
    /// The tensor (and every tensor that views it) must be gone before this side's turn ends and
    /// before the region is dropped: the type system does not see it borrow the region, so keep
    /// it within the call that made it.
    pub fn tensor(&self, offset: usize, shape: &[i64], kind: tch::Kind) -> io::Result<tch::Tensor> {
        let elements = shape.iter().try_fold(1usize, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)));
        let bytes = elements.and_then(|n| n.checked_mul(kind.elt_size_in_bytes()));
        let Some(bytes) = bytes else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("shape {shape:?} is out of range")));
        };
        let at = self.checked(offset, bytes)?;
        let mut strides = vec![1i64; shape.len()];
        for axis in (0..shape.len().saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1] * shape[axis + 1].max(1);
        }
        // SAFETY: `bytes` bytes at `at` lie inside this mapping (checked above), which is exactly
        // the extent of a contiguous tensor of this shape and kind; the caller keeps the tensor
        // within the mapping's life, as documented.
        unsafe { tch::Tensor::f_from_blob(at, shape, &strides, kind, tch::Device::Cpu) }
            .map_err(|e| io::Error::other(format!("cannot view shared memory as a tensor: {e}")))
    }
}

fn map(fd: &OwnedFd, len: usize) -> io::Result<Option<NonNull<u8>>> {
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: a new shared mapping of `len` bytes of `fd`, placed by the kernel: it aliases no
    // memory of this process, and it is unmapped once, on drop.
    let at = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, fd, 0) }?;
    Ok(NonNull::new(at.cast::<u8>()))
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Some(at) = self.at.take() {
            // SAFETY: the mapping made in `map`, of `self.len` bytes, unmapped only here.
            let _ = unsafe { rustix::mm::munmap(at.as_ptr().cast::<c_void>(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_mappings_see_the_same_bytes_and_tensors_write_through() {
        let server = Region::create("kiln-test", 64).expect("region");
        server.seal().expect("sealed");
        let fd = server.fd().try_clone_to_owned().expect("dup");
        let worker = Region::map(fd, 64).expect("mapped");
        server.write(8, &1.5f32.to_le_bytes()).expect("write");
        let view = worker.tensor(8, &[1], tch::Kind::Float).expect("view");
        assert_eq!(view.double_value(&[0]), 1.5);
        let mut out = worker.tensor(16, &[2, 2], tch::Kind::Float).expect("view");
        out.copy_(&tch::Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]));
        drop((view, out));
        let mut back = [0u8; 16];
        server.read(16, &mut back).expect("read");
        assert_eq!(back[12..], 4f32.to_le_bytes());
    }

    #[test]
    fn out_of_bounds_is_an_error_and_sealed_memory_cannot_grow_or_shrink() {
        let region = Region::create("kiln-test", 16).expect("region");
        assert!(region.write(10, &[0; 7]).is_err());
        assert!(region.read(usize::MAX, &mut [0; 2]).is_err());
        assert!(region.tensor(0, &[5], tch::Kind::Float).is_err());
        assert!(region.tensor(0, &[-1], tch::Kind::Float).is_err());
        region.seal().expect("sealed");
        assert!(rustix::fs::ftruncate(region.fd(), 8).is_err());
        assert!(rustix::fs::ftruncate(region.fd(), 32).is_err());
        let fd = region.fd().try_clone_to_owned().expect("dup");
        assert!(Region::map(fd, 32).is_err(), "more than the memory holds");
    }
}
