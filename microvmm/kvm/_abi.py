"""The <linux/kvm.h> ABI subset this project uses, as data.

This module is the single source of truth for three consumers:

* ``_build_ffi`` turns ``CDEF`` into the committed out-of-line cffi module
  ``_kvm_cffi.py`` (and ``_ffi`` falls back to parsing ``CDEF`` in-line if that
  module cannot be loaded);
* ``tests/test_kvm_abi.py`` generates a C program from ``CHECKED_FIELDS``
  (and ``constants.IOCTLS``) and compares it with the system's <linux/kvm.h>.

Only x86-64 layouts are declared. Union members we never read (s390, PPC,
RISC-V, Xen, Hyper-V exits) are left out: the ``padding`` members keep the
union sizes right, and the ABI test proves it.

Nothing here is imported on the start-up path (when ``_kvm_cffi`` loads).
"""

from __future__ import annotations

CDEF = """
struct kvm_debug_exit_arch {
    uint32_t exception; uint32_t pad; uint64_t pc; uint64_t dr6; uint64_t dr7;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};

/* x86: struct kvm_sregs and kvm_vcpu_events follow regs; unused here, and the
 * padding of kvm_run.s keeps the union's size. */
struct kvm_sync_regs { struct kvm_regs regs; };

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct {
            uint8_t direction; uint8_t size; uint16_t port; uint32_t count;
            uint64_t data_offset;
        } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct {
            uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write;
        } mmio;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct {
            uint32_t suberror; uint32_t ndata; uint64_t flags;
            uint8_t insn_size; uint8_t insn_bytes[15];
        } emulation_failure;
        struct {
            uint32_t type; uint32_t ndata;
            union { uint64_t flags; uint64_t data[16]; };
        } system_event;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union { struct kvm_sync_regs regs; char padding[2048]; } s;
};

struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector; uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable; uint8_t padding;
};

struct kvm_dtable { uint64_t base; uint16_t limit; uint16_t padding[3]; };

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t fpr[8][16];
    uint16_t fcw; uint16_t fsw; uint8_t ftwx; uint8_t pad1; uint16_t last_opcode;
    uint64_t last_ip; uint64_t last_dp;
    uint8_t xmm[16][16];
    uint32_t mxcsr; uint32_t pad2;
};

struct kvm_cpuid_entry2 {
    uint32_t function; uint32_t index; uint32_t flags;
    uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent; uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };

struct kvm_msrs {
    uint32_t nmsrs; uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags;
    uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr;
};

struct kvm_irqfd {
    uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; uint8_t pad[16];
};

struct kvm_ioeventfd {
    uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags;
    uint8_t pad[36];
};

struct kvm_irq_routing_irqchip { uint32_t irqchip; uint32_t pin; };

struct kvm_irq_routing_msi {
    uint32_t address_lo; uint32_t address_hi; uint32_t data;
    union { uint32_t pad; uint32_t devid; };
};

struct kvm_irq_routing_entry {
    uint32_t gsi; uint32_t type; uint32_t flags; uint32_t pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];
    } u;
};

struct kvm_irq_routing {
    uint32_t nr; uint32_t flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_msi {
    uint32_t address_lo; uint32_t address_hi; uint32_t data; uint32_t flags;
    uint32_t devid; uint8_t pad[12];
};

struct kvm_pit_config { uint32_t flags; uint32_t pad[15]; };

struct kvm_irq_level {
    union { uint32_t irq; int32_t status; };
    uint32_t level;
};

struct kvm_vcpu_events {
    struct {
        uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending;
        uint32_t error_code;
    } exception;
    struct { uint8_t injected; uint8_t nr; uint8_t soft; uint8_t shadow; } interrupt;
    struct { uint8_t injected; uint8_t pending; uint8_t masked; uint8_t pad; } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct {
        uint8_t smm; uint8_t pending; uint8_t smm_inside_nmi; uint8_t latched_init;
    } smi;
    struct { uint8_t pending; } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_guest_debug_arch { uint64_t debugreg[8]; };

struct kvm_guest_debug {
    uint32_t control; uint32_t pad;
    struct kvm_guest_debug_arch arch;
};

struct kvm_lapic_state { char regs[1024]; };

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t valid; uint8_t writeable; uint8_t usermode; uint8_t pad[5];
};

struct kvm_mp_state { uint32_t mp_state; };

int ioctl(int fd, unsigned long request, ...);
"""

# Every struct field the project reads or writes, as dotted paths (members of
# anonymous unions are named directly, as in C). The ABI test checks offset and
# size of each against gcc and <linux/kvm.h>, and sizeof of each struct.
CHECKED_FIELDS: dict[str, tuple[str, ...]] = {
    "struct kvm_run": (
        "request_interrupt_window", "immediate_exit", "exit_reason",
        "ready_for_interrupt_injection", "if_flag", "flags", "cr8", "apic_base",
        "hw.hardware_exit_reason",
        "fail_entry.hardware_entry_failure_reason", "fail_entry.cpu",
        "ex.exception", "ex.error_code",
        "io.direction", "io.size", "io.port", "io.count", "io.data_offset",
        "debug.arch.exception", "debug.arch.pc", "debug.arch.dr6", "debug.arch.dr7",
        "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write",
        "internal.suberror", "internal.ndata", "internal.data",
        "emulation_failure.suberror", "emulation_failure.ndata",
        "emulation_failure.flags", "emulation_failure.insn_size",
        "emulation_failure.insn_bytes",
        "system_event.type", "system_event.ndata", "system_event.flags",
        "system_event.data",
        "kvm_valid_regs", "kvm_dirty_regs", "s", "s.regs.regs",
    ),
    "struct kvm_regs": (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
        "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
    ),
    "struct kvm_segment": (
        "base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
        "avl", "unusable", "padding",
    ),
    "struct kvm_dtable": ("base", "limit", "padding"),
    "struct kvm_sregs": (
        "cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt", "gdt", "idt", "cr0", "cr2",
        "cr3", "cr4", "cr8", "efer", "apic_base", "interrupt_bitmap",
    ),
    "struct kvm_fpu": (
        "fpr", "fcw", "fsw", "ftwx", "pad1", "last_opcode", "last_ip", "last_dp",
        "xmm", "mxcsr", "pad2",
    ),
    "struct kvm_cpuid_entry2": (
        "function", "index", "flags", "eax", "ebx", "ecx", "edx", "padding",
    ),
    "struct kvm_cpuid2": ("nent", "padding", "entries"),
    "struct kvm_msr_entry": ("index", "reserved", "data"),
    "struct kvm_msrs": ("nmsrs", "pad", "entries"),
    "struct kvm_userspace_memory_region": (
        "slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr",
    ),
    "struct kvm_irqfd": ("fd", "gsi", "flags", "resamplefd", "pad"),
    "struct kvm_ioeventfd": ("datamatch", "addr", "len", "fd", "flags", "pad"),
    "struct kvm_irq_routing_irqchip": ("irqchip", "pin"),
    "struct kvm_irq_routing_msi": ("address_lo", "address_hi", "data", "pad", "devid"),
    "struct kvm_irq_routing_entry": (
        "gsi", "type", "flags", "pad", "u", "u.irqchip", "u.msi", "u.pad",
    ),
    "struct kvm_irq_routing": ("nr", "flags", "entries"),
    "struct kvm_msi": ("address_lo", "address_hi", "data", "flags", "devid", "pad"),
    "struct kvm_pit_config": ("flags", "pad"),
    "struct kvm_irq_level": ("irq", "status", "level"),
    "struct kvm_vcpu_events": (
        "exception.injected", "exception.nr", "exception.has_error_code",
        "exception.pending", "exception.error_code",
        "interrupt.injected", "interrupt.nr", "interrupt.soft", "interrupt.shadow",
        "nmi.injected", "nmi.pending", "nmi.masked", "nmi.pad",
        "sipi_vector", "flags", "smi.smm", "smi.pending", "smi.smm_inside_nmi",
        "smi.latched_init", "triple_fault.pending", "reserved",
        "exception_has_payload", "exception_payload",
    ),
    "struct kvm_debug_exit_arch": ("exception", "pad", "pc", "dr6", "dr7"),
    "struct kvm_guest_debug_arch": ("debugreg",),
    "struct kvm_guest_debug": ("control", "pad", "arch"),
    "struct kvm_lapic_state": ("regs",),
    "struct kvm_translation": (
        "linear_address", "physical_address", "valid", "writeable", "usermode", "pad",
    ),
    "struct kvm_mp_state": ("mp_state",),
}
