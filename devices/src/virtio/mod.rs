//! virtio devices and their MMIO transport.
