//! Checksummed block patterns written and read back with O_DIRECT: how the demo, the
//! migration tests and benches prove that no byte is lost or read stale across a
//! hand-off. Each 4 KiB block carries its index, a generation and a checksum, so a
//! reader can tell a stale block (older generation) from a torn or foreign one.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

pub const BLOCK: usize = 4096;
const MAGIC: u64 = 0x4841_4E44_4F46_4631; // "HANDOFF1"

/// A buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        assert!(
            len > 0 && len % BLOCK == 0,
            "O_DIRECT buffers are whole 4 KiB blocks"
        );
        let layout = std::alloc::Layout::from_size_align(len, BLOCK).expect("valid layout");
        // SAFETY: non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, BLOCK).expect("valid layout");
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

/// FNV-1a: enough to tell a block from any other block, not a security measure.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fills `buf` (one block) with the pattern of (index, generation).
pub fn fill_block(buf: &mut [u8], index: u64, generation: u64) {
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.rotate_left(17) ^ MAGIC;
    for chunk in buf[32..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&index.to_le_bytes());
    buf[16..24].copy_from_slice(&generation.to_le_bytes());
    let sum = checksum(&buf[32..]);
    buf[24..32].copy_from_slice(&sum.to_le_bytes());
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block {index}: never written (no pattern header)")]
    Unwritten { index: u64 },
    #[error("block {index}: holds block {found}'s data")]
    Misplaced { index: u64, found: u64 },
    #[error("block {index}: checksum mismatch (torn or corrupted)")]
    Corrupt { index: u64 },
    #[error("block {index}: stale, generation {found} where {expected} was written last")]
    Stale {
        index: u64,
        found: u64,
        expected: u64,
    },
}

/// Checks one block read back; returns its generation.
pub fn check_block(buf: &[u8], index: u64, expected: Option<u64>) -> Result<u64, BlockError> {
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return Err(BlockError::Unwritten { index });
    }
    if word(8) != index {
        return Err(BlockError::Misplaced {
            index,
            found: word(8),
        });
    }
    if word(24) != checksum(&buf[32..BLOCK]) {
        return Err(BlockError::Corrupt { index });
    }
    let generation = word(16);
    match expected {
        Some(e) if e != generation => Err(BlockError::Stale {
            index,
            found: generation,
            expected: e,
        }),
        _ => Ok(generation),
    }
}

pub fn open_direct(path: &Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Writes `blocks` blocks of `generation` starting at block `first`, then fsyncs.
pub fn write_blocks(dev: &File, first: u64, blocks: u64, generation: u64) -> std::io::Result<()> {
    let mut buf = AlignedBuf::new(BLOCK);
    for index in first..first + blocks {
        fill_block(buf.as_mut_slice(), index, generation);
        dev.write_all_at(buf.as_slice(), index * BLOCK as u64)?;
    }
    dev.sync_data()
}

/// Reads `expected.len()` blocks from block 0 and checks each against its generation.
pub fn verify_blocks(dev: &File, expected: &[u64]) -> Result<usize, String> {
    let mut buf = AlignedBuf::new(BLOCK);
    for (index, gen) in expected.iter().enumerate() {
        let index = index as u64;
        dev.read_exact_at(buf.as_mut_slice(), index * BLOCK as u64)
            .map_err(|e| format!("block {index}: read failed: {e}"))?;
        check_block(buf.as_slice(), index, Some(*gen)).map_err(|e| e.to_string())?;
    }
    Ok(expected.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_detect_every_fault() {
        let mut b = vec![0u8; BLOCK];
        fill_block(&mut b, 7, 3);
        assert_eq!(check_block(&b, 7, Some(3)), Ok(3));
        assert_eq!(
            check_block(&b, 7, Some(4)),
            Err(BlockError::Stale {
                index: 7,
                found: 3,
                expected: 4
            })
        );
        assert_eq!(
            check_block(&b, 8, None),
            Err(BlockError::Misplaced { index: 8, found: 7 })
        );
        b[100] ^= 1;
        assert_eq!(
            check_block(&b, 7, None),
            Err(BlockError::Corrupt { index: 7 })
        );
        assert_eq!(
            check_block(&[0u8; BLOCK], 1, None),
            Err(BlockError::Unwritten { index: 1 })
        );
    }

    #[test]
    fn generations_change_the_payload() {
        let (mut a, mut b) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
        fill_block(&mut a, 1, 1);
        fill_block(&mut b, 1, 2);
        assert_ne!(a[32..], b[32..]);
    }

    #[test]
    fn direct_io_round_trip_on_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(64 * BLOCK as u64)
            .unwrap();
        let f = open_direct(&path, true).unwrap();
        write_blocks(&f, 0, 64, 5).unwrap();
        assert_eq!(verify_blocks(&f, &[5; 64]), Ok(64));
        write_blocks(&f, 10, 1, 6).unwrap();
        let mut expected = vec![5; 64];
        expected[10] = 6;
        assert_eq!(verify_blocks(&f, &expected), Ok(64));
        assert!(verify_blocks(&f, &[5; 64]).unwrap_err().contains("stale"));
    }
}
