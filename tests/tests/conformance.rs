//! Backends on real servers keep the backend contract (`twinpath_core::testing::conformance`,
//! which the file plugin's and the san direct path's own tests also run): an smb image on a
//! private smbd, through the smb plugin as a config opens it.

use twinpath_core::testing::{conformance, CONFORMANCE_MIN_CAPACITY};
use twinpath_core::{DiskContext, OpenContext};
use twinpath_tests::samba::{Samba, SHARE};

#[test]
fn an_smb_image_keeps_the_backend_contract() {
    let smb = Samba::start();
    std::fs::write(
        smb.share_dir().join("vm.raw"),
        vec![0u8; 2 * CONFORMANCE_MIN_CAPACITY as usize],
    )
    .unwrap();
    let options = serde_yaml::from_str(&format!(
        "{{server: '{}', share: {SHARE}, path: vm.raw}}",
        smb.addr()
    ))
    .unwrap();
    let disk = DiskContext {
        name: "conformance".into(),
        read_only: false,
        lock: true,
    };
    let spec = twinpath_plugin_smb::plugin().parse(&disk, options).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctx = OpenContext::new(rt.handle().clone());
    conformance(|| rt.block_on(spec.open(&ctx)));
}
