//! The virtio-blk configuration space (virtio 1.2, 5.2.4), laid out by hand so the byte
//! offsets are explicit and independent of bindgen structs.

pub const WRITEBACK_OFFSET: usize = 32;
pub const CONFIG_LEN: usize = 60;

#[derive(Debug, Clone, Copy)]
pub struct BlkConfig {
    pub capacity_sectors: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub writeback: bool,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
}

impl BlkConfig {
    pub fn to_bytes(self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry, unused (no VIRTIO_BLK_F_GEOMETRY).
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // 24: physical_block_exp, 25: alignment_offset stay 0.
        b[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size, in blocks
        b[28..32].copy_from_slice(&0u32.to_le_bytes()); // opt_io_size: no preference
        b[WRITEBACK_OFFSET] = u8::from(self.writeback);
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        b[56] = 1; // write_zeroes_may_unmap
        b
    }

    /// The `[offset, offset + size)` window a frontend asked for. vhost-user requires exactly
    /// `size` bytes back; newer frontends know a longer struct (zoned fields), whose fields
    /// beyond ours belong to features we do not offer and read as zero.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec_offsets() {
        let c = BlkConfig {
            capacity_sectors: 0x0102_0304_0506_0708,
            size_max: 1 << 20,
            seg_max: 254,
            blk_size: 4096,
            writeback: true,
            num_queues: 3,
            max_discard_sectors: 7,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 9,
        };
        let b = c.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
        assert_eq!(c.read(32, 4), vec![1, 0, 3, 0]);
        assert_eq!(c.read(58, 10), vec![0; 10]);
        assert_eq!(
            c.read(0, 96).len(),
            96,
            "a frontend's longer struct is padded"
        );
        assert_eq!(c.read(100, 4), vec![0; 4]);
    }
}
