//! Header extensions between the fixed header and the backing file name: parsed in
//! order, each kind at most once, unknown ones kept for rewriting cluster 0.

use super::*;

impl Header {
    pub(super) fn parse_extensions(
        &mut self,
        bytes: &[u8],
        start: u64,
        end: u64,
    ) -> Result<(), FormatError> {
        let mut off = start;
        let mut seen: Vec<u32> = Vec::new();
        let mut count = 0usize;
        while off < end {
            if end - off < 8 {
                return Err(FormatError::invalid(
                    "header extension",
                    off,
                    format!(
                        "{} bytes left before the end of the area, too few for a record",
                        end - off
                    ),
                ));
            }
            let kind = be32(bytes, off as usize);
            let len = be32(bytes, off as usize + 4) as u64;
            if kind == ext::END {
                return Ok(());
            }
            count += 1;
            if count > MAX_EXTENSIONS {
                return Err(FormatError::invalid(
                    "header extension",
                    off,
                    format!("more than {MAX_EXTENSIONS} extensions"),
                ));
            }
            let data_start = off + 8;
            if len > end - data_start {
                return Err(FormatError::invalid(
                    format!("header extension {kind:#010x}"),
                    off,
                    format!("length {len} runs past the end of the extension area at {end:#x}"),
                ));
            }
            let data = &bytes[data_start as usize..(data_start + len) as usize];
            let known = matches!(
                kind,
                ext::BACKING_FORMAT | ext::FEATURE_TABLE | ext::BITMAPS | ext::FDE | ext::DATA_FILE
            );
            if known {
                if seen.contains(&kind) {
                    return Err(FormatError::invalid(
                        format!("header extension {kind:#010x}"),
                        off,
                        "appears twice",
                    ));
                }
                seen.push(kind);
            }
            match kind {
                ext::BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(FormatError::invalid(
                            "backing format extension",
                            off,
                            format!("format name of {len} bytes is too long (limit 15)"),
                        ));
                    }
                    self.backing_format = Some(text_keeping_length(data));
                }
                ext::FEATURE_TABLE => {
                    self.feature_names = data
                        .chunks_exact(48)
                        .map(|e| {
                            let raw = &e[2..48];
                            let n = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                            FeatureName {
                                kind: e[0],
                                bit: e[1],
                                name: text_keeping_length(&raw[..n]),
                            }
                        })
                        .collect();
                }
                ext::BITMAPS => {
                    if len != 24 {
                        return Err(FormatError::invalid(
                            "bitmaps extension",
                            off,
                            format!("length {len}, expected 24"),
                        ));
                    }
                    self.bitmaps = Some(BitmapsExt {
                        ext_offset: off,
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                    if be32(data, 4) != 0 {
                        return Err(FormatError::invalid(
                            "bitmaps extension reserved field",
                            data_start + 4,
                            "must be zero",
                        ));
                    }
                }
                ext::FDE => {
                    if len != 16 {
                        return Err(FormatError::invalid(
                            "encryption header extension",
                            off,
                            format!("length {len}, expected 16"),
                        ));
                    }
                    self.fde = Some((be64(data, 0), be64(data, 8)));
                }
                ext::DATA_FILE => {
                    self.data_file = Some(data.to_vec());
                }
                _ => self.unknown_extensions.push(UnknownExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            off = data_start + len.next_multiple_of(8);
        }
        Ok(())
    }
}

/// Bytes as text of the same length: valid UTF-8 as it is, otherwise every non-ASCII
/// byte as `?`, so that rewriting cluster 0 keeps every length and offset.
fn text_keeping_length(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => bytes
            .iter()
            .map(|&b| if b.is_ascii() { b as char } else { '?' })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::text_keeping_length;

    #[test]
    fn invalid_text_keeps_its_length() {
        assert_eq!(text_keeping_length(b"qcow2"), "qcow2");
        assert_eq!(
            text_keeping_length("d\u{e9}j\u{e0}".as_bytes()),
            "d\u{e9}j\u{e0}"
        );
        let odd = [b'q', 0xff, b'o', 0xc3];
        assert_eq!(text_keeping_length(&odd), "q?o?");
        assert_eq!(text_keeping_length(&odd).len(), odd.len());
    }
}
