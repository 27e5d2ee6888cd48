//! A small fixed-capacity byte string for instruction bytes.

use core::fmt;

/// Up to [`InsnBytes::CAPACITY`] bytes of machine code, kept inline so that no
/// allocation is needed to describe a patch site or a redirect.
///
/// `Debug` and `Display` print the bytes in hex, in memory order, which is what a
/// site error shows as "the bytes found".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InsnBytes {
    buf: [u8; Self::CAPACITY],
    len: u8,
}

impl InsnBytes {
    /// How many bytes fit.
    pub const CAPACITY: usize = 16;

    /// No bytes.
    pub const EMPTY: InsnBytes = InsnBytes {
        buf: [0; Self::CAPACITY],
        len: 0,
    };

    /// Copies `bytes`, or returns `None` if there are more than [`Self::CAPACITY`].
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut out = Self::EMPTY;
        out.extend(bytes)?;
        Some(out)
    }

    /// Copies at most [`Self::CAPACITY`] bytes of `bytes` (used to show what was found).
    pub fn prefix_of(bytes: &[u8]) -> Self {
        let n = bytes.len().min(Self::CAPACITY);
        let mut out = Self::EMPTY;
        if let (Some(dst), Some(src)) = (out.buf.get_mut(..n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        out.len = n as u8;
        out
    }

    /// Appends `bytes`; `None` (and no change) if they do not fit.
    pub fn extend(&mut self, bytes: &[u8]) -> Option<()> {
        let start = usize::from(self.len);
        let end = start.checked_add(bytes.len())?;
        self.buf.get_mut(start..end)?.copy_from_slice(bytes);
        self.len = end as u8;
        Some(())
    }

    /// Appends a 16-bit value in the given byte order.
    pub fn push_u16(&mut self, v: u16, endian: crate::Endian) -> Option<()> {
        match endian {
            crate::Endian::Little => self.extend(&v.to_le_bytes()),
            crate::Endian::Big => self.extend(&v.to_be_bytes()),
        }
    }

    /// Appends a 32-bit value in the given byte order.
    pub fn push_u32(&mut self, v: u32, endian: crate::Endian) -> Option<()> {
        match endian {
            crate::Endian::Little => self.extend(&v.to_le_bytes()),
            crate::Endian::Big => self.extend(&v.to_be_bytes()),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.buf.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for InsnBytes {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl fmt::Debug for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        fmt::Display::fmt(self, f)?;
        f.write_str("]")
    }
}

impl fmt::Display for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Reads a 32-bit word at `off` of `code`, in the given byte order.
pub fn read_u32(code: &[u8], off: usize, endian: crate::Endian) -> Option<u32> {
    let b: [u8; 4] = code.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(match endian {
        crate::Endian::Little => u32::from_le_bytes(b),
        crate::Endian::Big => u32::from_be_bytes(b),
    })
}

/// Reads a 16-bit value at `off` of `code`, in the given byte order.
pub fn read_u16(code: &[u8], off: usize, endian: crate::Endian) -> Option<u16> {
    let b: [u8; 2] = code.get(off..off.checked_add(2)?)?.try_into().ok()?;
    Some(match endian {
        crate::Endian::Little => u16::from_le_bytes(b),
        crate::Endian::Big => u16::from_be_bytes(b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::format;

    #[test]
    fn hex_display_and_capacity() {
        let b = InsnBytes::from_slice(&[0x0f, 0x1f, 0x44, 0, 0]).unwrap();
        assert_eq!(format!("{b}"), "0f 1f 44 00 00");
        assert_eq!(format!("{b:?}"), "[0f 1f 44 00 00]");
        assert!(InsnBytes::from_slice(&[0; 17]).is_none());
        assert_eq!(InsnBytes::prefix_of(&[1; 40]).len(), 16);
        let mut e = InsnBytes::from_slice(&[0; 14]).unwrap();
        assert!(e.push_u32(1, crate::Endian::Big).is_none());
        assert_eq!(e.len(), 14, "a failed push leaves the bytes unchanged");
    }

    #[test]
    fn reads_are_bounded() {
        assert_eq!(read_u32(&[1, 0, 0, 0], 0, crate::Endian::Little), Some(1));
        assert_eq!(
            read_u32(&[1, 0, 0, 0], 0, crate::Endian::Big),
            Some(0x0100_0000)
        );
        assert_eq!(read_u32(&[1, 0, 0], 0, crate::Endian::Little), None);
        assert_eq!(
            read_u32(&[1, 0, 0, 0], usize::MAX, crate::Endian::Little),
            None
        );
        assert_eq!(read_u16(&[0x12, 0x34], 0, crate::Endian::Big), Some(0x1234));
    }
}
