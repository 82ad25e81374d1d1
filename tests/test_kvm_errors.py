"""KVM error types: messages and fixes (no /dev/kvm needed)."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from microvmm.kvm import Kvm, KvmError, KvmUnavailableError


def test_kvm_error_names_the_ioctl_and_errno():
    exc = KvmError("KVM_CREATE_VM", errno.EINVAL)
    assert isinstance(exc, OSError)
    assert (exc.ioctl, exc.errno) == ("KVM_CREATE_VM", errno.EINVAL)
    assert str(exc) == f"KVM_CREATE_VM failed: [Errno {errno.EINVAL}] {os.strerror(errno.EINVAL)}"
    again = pickle.loads(pickle.dumps(exc))
    assert (type(again), str(again)) == (KvmError, str(exc))


def test_kvm_error_detail_is_appended():
    exc = KvmError("KVM_GET_MSRS", errno.EINVAL, "read 0 of 1 MSRs")
    assert str(exc).endswith("(read 0 of 1 MSRs)")


def test_missing_device_says_to_load_the_module(tmp_path):
    with pytest.raises(KvmUnavailableError) as info:
        Kvm(str(tmp_path / "no-kvm"))
    assert info.value.errno == errno.ENOENT
    assert "modprobe kvm_intel" in str(info.value)
    assert str(tmp_path / "no-kvm") in str(info.value)


def test_a_file_that_is_not_kvm_is_unavailable(tmp_path):
    not_kvm = tmp_path / "plain"
    not_kvm.write_bytes(b"")
    with pytest.raises(KvmUnavailableError) as info:
        Kvm(str(not_kvm))
    assert "not a KVM device" in str(info.value)


def test_permission_denied_suggests_the_kvm_group():
    exc = KvmUnavailableError.from_open_error("/dev/kvm", PermissionError(errno.EACCES, "denied"))
    assert str(exc) == ("cannot use /dev/kvm: Permission denied: add your user to the 'kvm' "
                        "group (sudo usermod -aG kvm $USER) or run as root")
