//! Memory for secrets: [`Locked`] keeps a value on pages of its own that are locked into
//! RAM (mlock, so they are never written to swap) and left out of core dumps where the
//! system allows, and wiped when the value is dropped; [`MasterKey`] is the unlocked key
//! of an image, held that way.
//!
//! Locking is best effort: a process over its `RLIMIT_MEMLOCK` still works, with a debug
//! log line. Every value gets whole pages, so unlocking one never unlocks another's page.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use zeroize::Zeroize;

/// The longest master key any supported cipher takes: two AES-256 keys for XTS.
pub const MAX_KEY_BYTES: usize = 64;

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

/// A value on pages of its own, locked into RAM where the system allows, zeroed and
/// unlocked when dropped (after the value's own `Drop`, which for the ciphers used here
/// wipes their key schedules).
pub struct Locked<T> {
    ptr: NonNull<T>,
    layout: Layout,
    locked: bool,
}

// SAFETY: `Locked<T>` owns its `T` exactly like a `Box<T>` does.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out `&T`.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    /// Moves `value` onto fresh pages and locks them. The moved-from stack copy is the
    /// caller's to wipe (values built in place through [`Locked::new_with`] have none).
    pub fn new(value: T) -> Self {
        Self::new_with(|| value)
    }

    /// Builds the value with `make` and moves it onto fresh locked pages.
    pub fn new_with(make: impl FnOnce() -> T) -> Self {
        let page = page_size();
        let size = std::mem::size_of::<T>().max(1).next_multiple_of(page);
        let align = std::mem::align_of::<T>().max(page);
        let layout = Layout::from_size_align(size, align).expect("page-sized layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) } as *mut T;
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        let locked = lock_pages(raw as *mut u8, size);
        // SAFETY: `ptr` is valid for writes of `T` and suitably aligned.
        unsafe { ptr.as_ptr().write(make()) };
        Locked {
            ptr,
            layout,
            locked,
        }
    }
}

fn lock_pages(addr: *mut u8, len: usize) -> bool {
    // SAFETY: [addr, addr+len) is one live allocation owned by the caller.
    let locked = unsafe { libc::mlock(addr as *const libc::c_void, len) } == 0;
    if !locked {
        log::debug!(
            "mlock of {len} bytes of key memory failed ({}); it may be swapped out",
            std::io::Error::last_os_error()
        );
    }
    #[cfg(target_os = "linux")]
    // SAFETY: as above; MADV_DONTDUMP only changes what a core dump contains.
    unsafe {
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTDUMP);
    }
    locked
}

impl<T> std::ops::Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised `T` until `drop`.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> std::ops::DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        let base = self.ptr.as_ptr() as *mut u8;
        // SAFETY: the value is initialised and dropped exactly once; afterwards the whole
        // allocation is plain bytes that we own until `dealloc`.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            std::slice::from_raw_parts_mut(base, self.layout.size()).zeroize();
            if self.locked {
                libc::munlock(base as *const libc::c_void, self.layout.size());
            }
            dealloc(base, self.layout);
        }
    }
}

/// The master key of an encrypted image: at most [`MAX_KEY_BYTES`], on locked pages,
/// wiped when dropped. It never prints its bytes.
pub struct MasterKey(Locked<KeyBytes>);

struct KeyBytes {
    len: usize,
    bytes: [u8; MAX_KEY_BYTES],
}

impl MasterKey {
    /// A copy of `bytes`, which must be 1 to [`MAX_KEY_BYTES`] long.
    pub fn from_slice(bytes: &[u8]) -> Option<MasterKey> {
        if bytes.is_empty() || bytes.len() > MAX_KEY_BYTES {
            return None;
        }
        let mut key = Locked::new_with(|| KeyBytes {
            len: 0,
            bytes: [0; MAX_KEY_BYTES],
        });
        key.bytes[..bytes.len()].copy_from_slice(bytes);
        key.len = bytes.len();
        Some(MasterKey(key))
    }

    /// A key of `len` bytes from the operating system's random source.
    pub fn random(len: usize) -> crate::Result<MasterKey> {
        if len == 0 || len > MAX_KEY_BYTES {
            return Err(crate::Error::invalid(format!(
                "a master key of {len} bytes is not between 1 and {MAX_KEY_BYTES}"
            )));
        }
        let mut key = MasterKey::from_slice(&[0u8; MAX_KEY_BYTES][..len]).expect("length checked");
        getrandom::fill(key.as_mut_bytes()).map_err(|e| {
            crate::Error::new(
                crate::ErrorKind::Io,
                format!("reading the system's random source for a master key: {e}"),
            )
        })?;
        Ok(key)
    }

    /// Length of the key in bytes.
    pub fn len(&self) -> usize {
        self.0.len
    }

    /// Whether the key is empty.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0.bytes[..self.0.len]
    }

    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8] {
        let len = self.0.len;
        &mut self.0.bytes[..len]
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_values_get_whole_pages() {
        let a = Locked::new([7u8; 3]);
        let b = Locked::new(5u64);
        let page = page_size();
        assert_eq!((&*a as *const _ as usize) % page, 0);
        assert_eq!((&*b as *const _ as usize) % page, 0);
        assert_eq!(*a, [7, 7, 7]);
        assert_eq!(*b, 5);
    }

    #[test]
    fn master_key_lengths_are_bounded() {
        assert!(MasterKey::from_slice(&[]).is_none());
        assert!(MasterKey::from_slice(&[1; MAX_KEY_BYTES + 1]).is_none());
        let k = MasterKey::from_slice(&[1, 2, 3]).unwrap();
        assert_eq!(k.as_bytes(), &[1, 2, 3]);
        assert_eq!(format!("{k:?}"), "MasterKey(3 bytes)");
        assert!(MasterKey::random(0).is_err());
        assert!(MasterKey::random(65).is_err());
        let r = MasterKey::random(32).unwrap();
        assert_eq!(r.len(), 32);
        let r2 = MasterKey::random(32).unwrap();
        assert_ne!(r.as_bytes(), r2.as_bytes(), "two random keys are equal");
    }
}
