//! Host groups by name, for the group a disk's socket is given.

use std::ffi::CString;

/// Why a group name names no group.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("group `{0}`: contains a NUL byte")]
    Nul(String),
    #[error("group `{name}`: {reason}")]
    Lookup { name: String, reason: String },
    #[error("there is no group `{0}` on this host")]
    NotFound(String),
}

/// The id of group `name` on this host (a number is taken as the id itself).
pub fn group_id(name: &str) -> Result<u32, GroupError> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c = CString::new(name).map_err(|_| GroupError::Nul(name.to_owned()))?;
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
        return Err(GroupError::Lookup {
            name: name.to_owned(),
            reason: std::io::Error::from_raw_os_error(r).to_string(),
        });
    }
    if found.is_null() {
        return Err(GroupError::NotFound(name.to_owned()));
    }
    Ok(gid)
}

#[cfg(test)]
mod tests {
    #[test]
    fn groups_by_name_and_number() {
        assert_eq!(super::group_id("root"), Ok(0));
        assert_eq!(super::group_id("1234"), Ok(1234));
        assert_eq!(
            super::group_id("no-such-group-here"),
            Err(super::GroupError::NotFound("no-such-group-here".into()))
        );
    }
}
