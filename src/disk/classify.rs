//! Reading a device's first and last MiB to decide whether it is blank, ours, or foreign,
//! before anything is written. Pure functions over bytes, so every signature is unit-tested.
//!
//! A device is *blank* only when both regions are entirely zero. Anything else that is not one
//! of our own signatures (a filesystem or md superblock carrying our label or array name) is
//! *foreign*, including data we cannot name: the safe answer to "unknown" is "not ours".

/// What is on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// First and last MiB are all zero.
    Blank,
    /// A filesystem with our label.
    OurFilesystem {
        /// `xfs` or `ext4`.
        fstype: &'static str,
    },
    /// A member of an md array with our name.
    OurArrayMember {
        /// Array UUID, hex.
        array_uuid: String,
        /// Number of members the array was created with.
        raid_disks: u32,
    },
    /// Anything else; never touched.
    Foreign {
        /// What was recognised, for the report.
        what: String,
    },
}

impl Content {
    /// Whether the device may be written by us.
    pub fn is_usable(&self) -> bool {
        !matches!(self, Content::Foreign { .. })
    }
}

/// Bytes read from each end of a device.
pub const PROBE_BYTES: usize = 1 << 20;

const MD_MAGIC: u32 = 0xa92b_4efc;

fn u16_le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn text(b: &[u8], at: usize, len: usize) -> String {
    let raw = b.get(at..at + len).unwrap_or(&[]);
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).trim().to_string()
}

/// Classifies a device from its first `head` and last `tail` bytes (each up to
/// [`PROBE_BYTES`]); `label` is our filesystem label and array name.
pub fn classify(head: &[u8], tail: &[u8], label: &str) -> Content {
    // md superblock 1.2 sits 4 KiB in; 1.0 and 0.90 sit near the end and are caught below.
    if u32_le(head, 4096) == Some(MD_MAGIC) {
        let sb = &head[4096..];
        let name = text(sb, 32, 32);
        let array_name = name.rsplit(':').next().unwrap_or("");
        let uuid: String = sb
            .get(16..32)
            .unwrap_or(&[])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if array_name == label {
            return Content::OurArrayMember {
                array_uuid: uuid,
                raid_disks: u32_le(sb, 92).unwrap_or(0),
            };
        }
        return Content::Foreign {
            what: format!("a member of md array {name:?}"),
        };
    }
    if head.get(0..4) == Some(b"XFSB") {
        let found = text(head, 108, 12);
        if found == label {
            return Content::OurFilesystem { fstype: "xfs" };
        }
        return Content::Foreign {
            what: format!("an xfs filesystem labelled {found:?}"),
        };
    }
    if u16_le(head, 1024 + 56) == Some(0xEF53) {
        let found = text(head, 1024 + 120, 16);
        if found == label {
            return Content::OurFilesystem { fstype: "ext4" };
        }
        return Content::Foreign {
            what: format!("an ext2/3/4 filesystem labelled {found:?}"),
        };
    }
    if head.get(512..520) == Some(b"EFI PART") {
        return Content::Foreign {
            what: "a GPT partition table".into(),
        };
    }
    if head.get(512..520) == Some(b"LABELONE") {
        return Content::Foreign {
            what: "an LVM physical volume".into(),
        };
    }
    if head.get(4086..4096) == Some(b"SWAPSPACE2") {
        return Content::Foreign {
            what: "swap space".into(),
        };
    }
    if head.get(65600..65608) == Some(b"_BHRfS_M") {
        return Content::Foreign {
            what: "a btrfs filesystem".into(),
        };
    }
    if head.get(510..512) == Some(&[0x55, 0xAA]) {
        return Content::Foreign {
            what: "an MBR partition table or boot sector".into(),
        };
    }
    let tail_md = tail
        .windows(4)
        .step_by(4)
        .any(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) == MD_MAGIC);
    if tail_md {
        return Content::Foreign {
            what: "an md superblock (metadata 0.90/1.0) at the end".into(),
        };
    }
    if tail.len() >= 512 && tail.get(tail.len() - 512..tail.len() - 504) == Some(b"EFI PART") {
        return Content::Foreign {
            what: "a backup GPT header".into(),
        };
    }
    if head.iter().chain(tail).all(|&b| b == 0) {
        return Content::Blank;
    }
    Content::Foreign {
        what: "unrecognised data".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeros() -> Vec<u8> {
        vec![0u8; PROBE_BYTES]
    }

    #[test]
    fn all_zero_is_blank_and_one_stray_byte_is_not() {
        assert_eq!(classify(&zeros(), &zeros(), "modelcache"), Content::Blank);
        let mut tail = zeros();
        tail[12345] = 1;
        assert!(matches!(
            classify(&zeros(), &tail, "modelcache"),
            Content::Foreign { .. }
        ));
    }

    #[test]
    fn filesystems_are_ours_only_with_our_label() {
        let mut xfs = zeros();
        xfs[0..4].copy_from_slice(b"XFSB");
        xfs[108..118].copy_from_slice(b"modelcache");
        assert_eq!(
            classify(&xfs, &zeros(), "modelcache"),
            Content::OurFilesystem { fstype: "xfs" }
        );
        xfs[108..118].copy_from_slice(b"datadisk\0\0");
        assert!(
            matches!(classify(&xfs, &zeros(), "modelcache"), Content::Foreign { what } if what.contains("datadisk"))
        );

        let mut ext = zeros();
        ext[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
        ext[1144..1154].copy_from_slice(b"modelcache");
        assert_eq!(
            classify(&ext, &zeros(), "modelcache"),
            Content::OurFilesystem { fstype: "ext4" }
        );
        ext[1144..1154].copy_from_slice(b"other\0\0\0\0\0");
        assert!(matches!(
            classify(&ext, &zeros(), "modelcache"),
            Content::Foreign { .. }
        ));
    }

    #[test]
    fn partition_tables_and_other_signatures_are_foreign() {
        for (offset, sig) in [
            (512usize, &b"EFI PART"[..]),
            (512, b"LABELONE"),
            (4086, b"SWAPSPACE2"),
            (65600, b"_BHRfS_M"),
            (510, &[0x55, 0xAA]),
        ] {
            let mut head = zeros();
            head[offset..offset + sig.len()].copy_from_slice(sig);
            assert!(
                matches!(
                    classify(&head, &zeros(), "modelcache"),
                    Content::Foreign { .. }
                ),
                "{sig:?}"
            );
        }
    }

    #[test]
    fn md_members_are_ours_by_array_name() {
        let mut head = zeros();
        head[4096..4100].copy_from_slice(&MD_MAGIC.to_le_bytes());
        head[4096 + 16..4096 + 32].copy_from_slice(&[7u8; 16]);
        head[4096 + 32..4096 + 46].copy_from_slice(b"any:modelcache");
        head[4096 + 92..4096 + 96].copy_from_slice(&4u32.to_le_bytes());
        match classify(&head, &zeros(), "modelcache") {
            Content::OurArrayMember {
                array_uuid,
                raid_disks,
            } => {
                assert_eq!(array_uuid, "07".repeat(16));
                assert_eq!(raid_disks, 4);
            }
            other => panic!("{other:?}"),
        }
        head[4096 + 32..4096 + 46].copy_from_slice(b"any:someoneels");
        assert!(matches!(
            classify(&head, &zeros(), "modelcache"),
            Content::Foreign { .. }
        ));
    }
}
