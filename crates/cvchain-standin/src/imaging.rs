//! Image bytes as the service judges them: one of the formats it takes (JPEG, PNG, GIF, BMP),
//! at most 6 MB, with the dimensions read from the header; and small valid PNGs for scripts and
//! tests that need training images.

/// The service's limit per image.
pub const MAX_IMAGE_BYTES: usize = 6 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok {
        width: u32,
        height: u32,
    },
    /// Not JPEG, PNG, GIF or BMP, or a header that cannot be read.
    Format,
    /// Empty or over [`MAX_IMAGE_BYTES`].
    Size,
}

pub fn judge(bytes: &[u8]) -> Verdict {
    if bytes.is_empty() || bytes.len() > MAX_IMAGE_BYTES {
        return Verdict::Size;
    }
    match dimensions(bytes) {
        Some((width, height)) if width > 0 && height > 0 => Verdict::Ok { width, height },
        _ => Verdict::Format,
    }
}

fn be16(b: &[u8], at: usize) -> Option<u32> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]) as u32)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> Option<u32> {
    Some(u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]) as u32)
}

fn le32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn dimensions(b: &[u8]) -> Option<(u32, u32)> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") && b.get(12..16) == Some(b"IHDR") {
        return Some((be32(b, 16)?, be32(b, 20)?));
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        return Some((le16(b, 6)?, le16(b, 8)?));
    }
    if b.starts_with(b"BM") {
        return Some((le32(b, 18)?.unsigned_abs(), le32(b, 22)?.unsigned_abs()));
    }
    if b.starts_with(&[0xFF, 0xD8]) {
        // Walk the segments to a start-of-frame marker.
        let mut i = 2;
        while i + 9 < b.len() {
            if b[i] != 0xFF {
                return None;
            }
            let marker = b[i + 1];
            let len = be16(b, i + 2)? as usize;
            if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
                return Some((be16(b, i + 7)?, be16(b, i + 5)?));
            }
            i += 2 + len;
        }
    }
    None
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + byte as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// A valid `size`×`size` PNG of one colour (uncompressed deflate): distinct colours make
/// distinct images, which the service does not merge as duplicates.
pub fn solid_png(size: u32, rgb: [u8; 3]) -> Vec<u8> {
    // Each scanline: filter type 0 (none), then the pixels.
    let mut line = vec![0u8];
    line.extend(rgb.repeat(size as usize));
    let raw = line.repeat(size as usize);
    // zlib stream of stored blocks (at most 65535 bytes each).
    let mut z = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (n, chunk) in chunks.iter().enumerate() {
        z.push(u8::from(n + 1 == chunks.len()));
        let len = chunk.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(chunk);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&size.to_be_bytes());
    ihdr.extend_from_slice(&size.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    png
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_sizes_are_judged_from_the_bytes() {
        assert_eq!(
            judge(&solid_png(32, [1, 2, 3])),
            Verdict::Ok {
                width: 32,
                height: 32
            }
        );
        let gif = b"GIF89a\x10\x00\x08\x00rest";
        assert_eq!(
            judge(gif),
            Verdict::Ok {
                width: 16,
                height: 8
            }
        );
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x00,
            0x20, 0x00, 0x40, 0x01, 0x01, 0x11, 0x00,
        ];
        assert_eq!(
            judge(&jpeg),
            Verdict::Ok {
                width: 64,
                height: 32
            }
        );
        assert_eq!(judge(b"not an image at all"), Verdict::Format);
        assert_eq!(judge(b""), Verdict::Size);
        assert_eq!(judge(&vec![0u8; MAX_IMAGE_BYTES + 1]), Verdict::Size);
    }

    #[test]
    fn the_png_encoder_writes_what_a_decoder_reads() {
        // Checked against the crc of a known chunk: IEND's is fixed.
        let png = solid_png(2, [255, 0, 0]);
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
        assert_ne!(solid_png(8, [1, 1, 1]), solid_png(8, [1, 1, 2]));
    }
}
