//! The checks a strict reader makes at open (design.md, "Hostile input"):
//! feature bits, field ranges, table locations and sizes.

use super::*;

impl Header {
    pub(super) fn validate_fields(&mut self, crypt: u32) -> Result<(), FormatError> {
        let cs = self.cluster_size();
        if self.version == 3 {
            let unknown = self.incompatible_features & !incompat::KNOWN;
            if unknown != 0 {
                let bits: Vec<String> = (0..64u8)
                    .filter(|b| unknown & (1u64 << b) != 0)
                    .map(|b| match self.feature_name(0, b) {
                        Some(n) => format!("bit {b} ({n})"),
                        None => format!("bit {b}"),
                    })
                    .collect();
                return Err(FormatError::unsupported(
                    "incompatible_features",
                    72,
                    format!("unknown incompatible feature {}", bits.join(", ")),
                ));
            }
            if self.refcount_order > 6 {
                return Err(FormatError::invalid(
                    "refcount_order",
                    96,
                    format!(
                        "{} is larger than 6 (64-bit refcounts)",
                        self.refcount_order
                    ),
                ));
            }
            let ctype = if self.header_length as usize > V3_MIN_HEADER_LEN {
                self.tail[0]
            } else {
                0
            };
            self.compression_type = match ctype {
                0 => CompressionType::Deflate,
                1 => CompressionType::Zstd,
                other => {
                    return Err(FormatError::unsupported(
                        "compression_type",
                        104,
                        format!("unknown compression type {other}"),
                    ));
                }
            };
            let bit = self.incompatible_features & incompat::COMPRESSION != 0;
            if bit != (ctype != 0) {
                return Err(FormatError::invalid(
                    "compression_type",
                    104,
                    if bit {
                        "incompatible bit 3 (compression type) is set but the type is zlib"
                            .to_string()
                    } else {
                        format!("type {ctype} needs incompatible bit 3 (compression type)")
                    },
                ));
            }
        }
        match crypt {
            0 => self.crypt_method = CryptMethod::None,
            1 => self.crypt_method = CryptMethod::Aes,
            2 => self.crypt_method = CryptMethod::Luks,
            other => {
                return Err(FormatError::invalid(
                    "crypt_method",
                    32,
                    format!("unknown encryption method {other}"),
                ));
            }
        }
        if self.crypt_method == CryptMethod::Luks && self.fde.is_none() {
            return Err(FormatError::invalid(
                "crypt_method",
                32,
                "LUKS encryption without the full-disk-encryption header extension",
            ));
        }
        if self.crypt_method != CryptMethod::Luks && self.fde.is_some() {
            return Err(FormatError::invalid(
                "encryption header extension",
                self.header_length as u64,
                "present although crypt_method is not LUKS",
            ));
        }
        if let Some((offset, length)) = self.fde {
            if offset % cs != 0 {
                return Err(FormatError::invalid(
                    "encryption header extension",
                    self.header_length as u64,
                    format!("LUKS area offset {offset:#x} is not aligned to the cluster size {cs}"),
                ));
            }
            if length == 0 {
                return Err(FormatError::invalid(
                    "encryption header extension",
                    self.header_length as u64,
                    "LUKS area length is 0",
                ));
            }
        }
        for (field, at, value) in [
            ("l1_table_offset", 40, self.l1_table_offset),
            ("refcount_table_offset", 48, self.refcount_table_offset),
            ("snapshots_offset", 64, self.snapshots_offset),
        ] {
            if value % cs != 0 {
                return Err(FormatError::invalid(
                    field,
                    at,
                    format!("{value:#x} is not aligned to the cluster size {cs}"),
                ));
            }
        }
        if self.refcount_table_clusters == 0 {
            return Err(FormatError::invalid("refcount_table_clusters", 56, "is 0"));
        }
        if self.refcount_table_clusters as u64 * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(FormatError::invalid(
                "refcount_table_clusters",
                56,
                format!(
                    "{} clusters exceed the 8 MiB refcount-table limit",
                    self.refcount_table_clusters
                ),
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::invalid(
                "nb_snapshots",
                60,
                format!(
                    "{} is more than the limit of {MAX_SNAPSHOTS}",
                    self.nb_snapshots
                ),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(FormatError::invalid(
                "incompatible_features",
                72,
                format!(
                    "extended L2 entries need clusters of at least 16 KiB, cluster_bits is {}",
                    self.cluster_bits
                ),
            ));
        }
        if self.l1_size as u64 > MAX_L1_ENTRIES {
            return Err(FormatError::invalid(
                "l1_size",
                36,
                format!("{} entries exceed the 32 MiB L1 limit", self.l1_size),
            ));
        }
        let needed = self.l1_entries_for(self.virtual_size());
        if needed > MAX_L1_ENTRIES {
            return Err(FormatError::invalid(
                "size",
                24,
                format!(
                    "{} bytes need {needed} L1 entries, more than the 32 MiB L1 limit",
                    self.size
                ),
            ));
        }
        if (self.l1_size as u64) < needed {
            return Err(FormatError::invalid(
                "l1_size",
                36,
                format!(
                    "{} entries cannot cover the disk size {} (needs {needed})",
                    self.l1_size, self.size
                ),
            ));
        }
        if self.l1_size != 0 && self.l1_table_offset == 0 {
            return Err(FormatError::invalid(
                "l1_table_offset",
                40,
                "is 0 (the header cluster) although the L1 table has entries",
            ));
        }
        if self.has_data_file() && self.data_file.is_none() {
            return Err(FormatError::invalid(
                "incompatible_features",
                72,
                "the external data file bit is set but the image does not name a data file",
            ));
        }
        if self.data_file_raw() && !self.has_data_file() {
            return Err(FormatError::invalid(
                "autoclear_features",
                88,
                "data-file-raw (bit 1) is set without an external data file",
            ));
        }
        Ok(())
    }
}
