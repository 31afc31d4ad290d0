//! Decompression of compressed clusters: a raw deflate stream or
//! zstd frames that must produce exactly one cluster.

use super::header::CompressionType;
use std::cell::RefCell;
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

thread_local! {
    // Decoder state is reused per thread: creating a zstd context per cluster costs more
    // than decoding a small one.
    static INFLATER: RefCell<libdeflater::Decompressor> =
        RefCell::new(libdeflater::Decompressor::new());
    static ZSTD: RefCell<Option<Decoder<'static>>> = const { RefCell::new(None) };
}

/// Why a compressed cluster could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecompressError {
    #[error("deflate stream is damaged")]
    /// The deflate stream is damaged.
    Deflate,
    #[error("deflate stream yields {0} bytes instead of a whole cluster")]
    /// The deflate stream ends short of a whole cluster (the bytes it yields).
    Short(usize),
    #[error("zstd data is damaged: {0}")]
    /// The zstd data is damaged (zstd's message).
    Zstd(String),
    #[error("zstd data stops making progress before a whole cluster")]
    /// The zstd decoder stops before a whole cluster.
    ZstdStalled,
    #[error("zstd frame continues past the end of the cluster")]
    /// The zstd frame goes on past the cluster.
    ZstdOverlong,
}

/// Decompresses `input` into `out`, which must be exactly one cluster long.
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    INFLATER.with_borrow_mut(|d| match d.deflate_decompress(input, out) {
        Ok(n) if n == out.len() => Ok(()),
        Ok(n) => Err(DecompressError::Short(n)),
        Err(_) => Err(DecompressError::Deflate),
    })
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let err = |e: std::io::Error| DecompressError::Zstd(e.to_string());
    ZSTD.with_borrow_mut(|slot| {
        let dec = match slot {
            Some(d) => {
                d.reinit().map_err(err)?;
                d
            }
            None => slot.insert(Decoder::new().map_err(err)?),
        };
        unzstd_with(dec, input, out)
    })
}

fn unzstd_with(
    dec: &mut Decoder<'static>,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    let mut hint = 0;
    while outb.pos() < outb.capacity() {
        let (in_before, out_before) = (inb.pos(), outb.pos());
        hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| DecompressError::Zstd(e.to_string()))?;
        if inb.pos() == in_before && outb.pos() == out_before {
            return Err(DecompressError::ZstdStalled);
        }
    }
    if hint > 0 {
        return Err(DecompressError::ZstdOverlong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_exact_cluster() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut buf = vec![0u8; 8192];
        let n = c.deflate_compress(&data, &mut buf).unwrap();
        buf.truncate(n);
        buf.extend_from_slice(&[0xaa; 300]); // trailing bytes are normal
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Deflate, &buf, &mut out).unwrap();
        assert_eq!(out, data);
        let mut big = vec![0u8; 8192];
        assert_eq!(
            decompress(CompressionType::Deflate, &buf, &mut big),
            Err(DecompressError::Short(4096))
        );
        let mut small = vec![0u8; 2048];
        assert!(decompress(CompressionType::Deflate, &buf, &mut small).is_err());
    }

    #[test]
    fn zstd_exact_cluster() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        let mut comp = zstd::bulk::compress(&data, 3).unwrap();
        comp.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &comp, &mut out).unwrap();
        assert_eq!(out, data);
        let mut small = vec![0u8; 4096];
        assert_eq!(
            decompress(CompressionType::Zstd, &comp, &mut small),
            Err(DecompressError::ZstdOverlong)
        );
        assert!(decompress(CompressionType::Zstd, &[1, 2, 3, 4, 5, 6, 7, 8], &mut out).is_err());
    }
}
