//! bf16 autocast around a forward pass: libtorch runs the ops that gain from a lower precision
//! (matrix products, convolutions) in bf16 on inputs and weights it casts for them, from a
//! thread-local switch, exactly as `torch.autocast(device, dtype=torch.bfloat16)` does in
//! Python. Ops it does not list run in their inputs' type (on the CPU, softmax and layer norm
//! after a bf16 matrix product run in bf16; CUDA's list keeps more of them in FP32).
//!
//! tch wraps only CUDA's switch (`at::autocast::set_enabled`), so Kiln calls libtorch's own
//! functions, which take a device type and a scalar type. They are C++ functions of plain
//! arguments (an 8-bit enum, a bool) that throw nothing, so they are declared here by their
//! mangled names: a libtorch that renamed or changed one fails to link, never to run.

// Calls into libtorch; each is a thread-local setter that cannot fail.
#![allow(unsafe_code)]

use tch::Device;

/// `c10::DeviceType`'s values for the devices Kiln runs on.
const CPU: i8 = 0;
const CUDA: i8 = 1;
/// `c10::ScalarType::BFloat16` (the tests check a matrix product comes out in it).
const BF16: i8 = 15;

unsafe extern "C" {
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn is_autocast_enabled(device: i8) -> bool;
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn set_autocast_enabled(device: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn get_autocast_dtype(device: i8) -> i8;
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn set_autocast_dtype(device: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn increment_nesting() -> i32;
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn decrement_nesting() -> i32;
    #[link_name = "_ZN2at8autocast25is_autocast_cache_enabledEv"]
    fn is_autocast_cache_enabled() -> bool;
    #[link_name = "_ZN2at8autocast26set_autocast_cache_enabledEb"]
    fn set_autocast_cache_enabled(enabled: bool);
}

/// bf16 autocast on the calling thread for `device` while it lives; dropping it restores what
/// was set before. Autocast's cache of cast weights is off meanwhile: it is one map for the
/// whole process behind one lock, and CPU replicas share their module, so one replica's pass
/// ending would clear the copies another's is using; a pass uses each weight once anyway.
pub(super) struct Bf16 {
    device: i8,
    was_enabled: bool,
    was_dtype: i8,
    was_caching: bool,
}

impl Bf16 {
    pub(super) fn enter(device: Device) -> Bf16 {
        let device = if device == Device::Cpu { CPU } else { CUDA };
        // SAFETY: thread-local setters of libtorch taking plain values; none throws.
        unsafe {
            let guard = Bf16 {
                device,
                was_enabled: is_autocast_enabled(device),
                was_dtype: get_autocast_dtype(device),
                was_caching: is_autocast_cache_enabled(),
            };
            set_autocast_enabled(device, true);
            set_autocast_dtype(device, BF16);
            set_autocast_cache_enabled(false);
            increment_nesting();
            guard
        }
    }
}

impl Drop for Bf16 {
    fn drop(&mut self) {
        // SAFETY: as in `enter`. Nothing was cached, so there is no cache to clear.
        unsafe {
            decrement_nesting();
            set_autocast_cache_enabled(self.was_caching);
            set_autocast_enabled(self.device, self.was_enabled);
            set_autocast_dtype(self.device, self.was_dtype);
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::Bf16;

    #[test]
    fn a_matrix_product_runs_in_bf16_inside_and_in_fp32_again_after() {
        let a = Tensor::ones([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::ones([8, 2], (Kind::Float, Device::Cpu));
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
        {
            let _outer = Bf16::enter(Device::Cpu);
            {
                let _inner = Bf16::enter(Device::Cpu);
                assert_eq!(a.matmul(&b).kind(), Kind::BFloat16);
            }
            // Leaving a nested autocast keeps the outer one on.
            assert_eq!(a.matmul(&b).kind(), Kind::BFloat16);
            // Ops autocast does not list run in their inputs' type.
            assert_eq!(a.softmax(-1, None::<Kind>).kind(), Kind::Float);
            assert_eq!(a.matmul(&b).softmax(-1, None::<Kind>).kind(), Kind::BFloat16);
        }
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
    }
}
