//! Host groups by name, for the group a disk's socket is given.

use std::ffi::CString;

/// The id of group `name` on this host (a number is taken as the id itself).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c = CString::new(name).map_err(|_| format!("group `{name}`: contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed group is a valid out-parameter; getgrnam_r fills it with pointers into
    // `buf`, which outlives its use here, and sets `found` to it or to null.
    let (r, found, gid) = unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut found: *mut libc::group = std::ptr::null_mut();
        let r = libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        );
        (r, found, grp.gr_gid)
    };
    if r != 0 {
        return Err(format!(
            "group `{name}`: {}",
            std::io::Error::from_raw_os_error(r)
        ));
    }
    if found.is_null() {
        return Err(format!("there is no group `{name}` on this host"));
    }
    Ok(gid)
}

#[cfg(test)]
mod tests {
    #[test]
    fn groups_by_name_and_number() {
        assert_eq!(super::group_id("root"), Ok(0));
        assert_eq!(super::group_id("1234"), Ok(1234));
        let e = super::group_id("no-such-group-here").unwrap_err();
        assert!(e.contains("no group"), "{e}");
    }
}
