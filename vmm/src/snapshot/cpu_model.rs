//! The host CPU model a snapshot records and a restore compares (vendor, signature, brand),
//! read with CPUID.

use serde::{Deserialize, Serialize};

/// The host CPU a snapshot was taken on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    pub vendor: String,
    /// CPUID leaf 1 EAX: family, model, stepping.
    pub signature: u32,
    pub brand: String,
}

impl CpuModel {
    /// This host's CPU.
    pub fn host() -> CpuModel {
        use std::arch::x86_64::__cpuid;
        // (CPUID is safe to call on x86_64: it exists on every such CPU, no side effects.)
        let l0 = __cpuid(0);
        let mut vendor = Vec::with_capacity(12);
        for r in [l0.ebx, l0.edx, l0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let signature = __cpuid(1).eax;
        let mut brand = Vec::with_capacity(48);
        // Leaf 0x8000_0000 says whether the brand leaves exist.
        if __cpuid(0x8000_0000).eax >= 0x8000_0004 {
            for leaf in 0x8000_0002u32..=0x8000_0004 {
                let r = __cpuid(leaf);
                for v in [r.eax, r.ebx, r.ecx, r.edx] {
                    brand.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        CpuModel {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            signature,
            brand: String::from_utf8_lossy(&brand)
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string(),
        }
    }

    pub fn describe(&self) -> String {
        let s = self.signature;
        let family = ((s >> 8) & 0xf)
            + if (s >> 8) & 0xf == 0xf {
                (s >> 20) & 0xff
            } else {
                0
            };
        let model = ((s >> 4) & 0xf) | (((s >> 16) & 0xf) << 4);
        format!(
            "'{}' ({}, family {family} model {model} stepping {})",
            self.brand,
            self.vendor,
            s & 0xf
        )
    }
}
