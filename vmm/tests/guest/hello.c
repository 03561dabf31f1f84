/* thinvm's tiny test guest: prints on the serial port, takes a LAPIC timer interrupt, then
   ends the VM the way the kernel command line asks: `mode=reset` (i8042 reset, the default),
   `mode=halt` (cli; hlt on every CPU, what Linux does for halt without ACPI),
   `mode=triple` (triple fault), `mode=spin` (idle until stopped), `mode=cx16` (a cmpxchg16b right after an I/O exit, which
   software-nested KVM hosts cannot emulate), `mode=debug-exit` (writes `exitval=` with an
   I/O write of `exitwidth=` bytes (1, 2, 4) to port `exitport=` (default 0x501), then, if the
   VM is still running, says so and resets). */
#include "guest.h"

struct idt_gate {
    u16 off_lo, sel;
    u8 ist, attr;
    u16 off_mid;
    u32 off_hi, zero;
} __attribute__((packed));

struct idt_ptr { u16 limit; u64 base; } __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));
static volatile int ticks;

#define LAPIC 0xfee00000UL

struct interrupt_frame;

__attribute__((interrupt)) static void timer_isr(struct interrupt_frame *f) {
    (void)f;
    ticks++;
    mmio_write32(LAPIC + 0xb0, 0); /* EOI */
}

static void set_gate(int vec, void (*h)(struct interrupt_frame *)) {
    u64 a = (u64)h;
    idt[vec].off_lo = a & 0xffff;
    idt[vec].sel = 0x08;
    idt[vec].ist = 0;
    idt[vec].attr = 0x8e;
    idt[vec].off_mid = (a >> 16) & 0xffff;
    idt[vec].off_hi = a >> 32;
    idt[vec].zero = 0;
}

void guest_main(const u8 *boot_params) {
    const char *cmdline = boot_cmdline(boot_params);
    puts_serial("thinvm-test-guest: hello\n");
    puts_serial("cmdline: ");
    puts_serial(cmdline);
    puts_serial("\n");

    set_gate(0x40, timer_isr);
    struct idt_ptr p = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(p));
    /* Software-enable the LAPIC, one-shot timer on vector 0x40. */
    mmio_write32(LAPIC + 0xf0, 0x1ff);
    mmio_write32(LAPIC + 0x3e0, 0xb);
    mmio_write32(LAPIC + 0x320, 0x40);
    mmio_write32(LAPIC + 0x380, 200000);
    /* "sti; hlt" back to back: sti's interrupt shadow guarantees the interrupt is taken
       only once hlt is waiting, so it cannot slip in between the check and the hlt. */
    while (!ticks) __asm__ volatile("sti; hlt; cli");
    puts_serial("thinvm-test-guest: timer interrupt received\n");

    if (has_word(cmdline, "mode=spin")) {
        puts_serial("thinvm-test-guest: idling until stopped\n");
        __asm__ volatile("sti");
        for (;;) __asm__ volatile("hlt");
    }
    if (has_word(cmdline, "mode=halt")) {
        puts_serial("thinvm-test-guest: halting\n");
        for (;;) __asm__ volatile("cli; hlt");
    }
    if (has_word(cmdline, "mode=triple")) {
        puts_serial("thinvm-test-guest: triple fault\n");
        struct idt_ptr none = { 0, 0 };
        /* No IDT, then a page fault on an unmapped address: #PF -> #DF -> triple fault. */
        __asm__ volatile("lidt %0" : : "m"(none));
        (void)*(volatile u64 *)0x4000000000UL;
    }
    if (has_word(cmdline, "mode=cx16")) {
        static u64 pair[2] __attribute__((aligned(16))) = { 1, 2 };
        u64 lo = 1, hi = 2;
        /* An I/O exit, then cmpxchg16b: the first instruction the host emulates. */
        __asm__ volatile("outb %%al, $0x80\n\tlock cmpxchg16b %0"
                         : "+m"(pair[0]), "+a"(lo), "+d"(hi)
                         : "b"(3UL), "c"(4UL)
                         : "memory");
        puts_serial("thinvm-test-guest: cmpxchg16b ok ");
        put_dec(pair[0]);
        puts_serial("\n");
    }
    if (has_word(cmdline, "mode=debug-exit")) {
        u16 port = (u16)param_u64(cmdline, "exitport=", 0x501);
        u64 val = param_u64(cmdline, "exitval=", 0);
        u64 width = param_u64(cmdline, "exitwidth=", 2);
        puts_serial("thinvm-test-guest: debug exit ");
        put_dec(val);
        puts_serial("\n");
        if (width == 1) outb(port, (u8)val);
        else if (width == 4) outl(port, (u32)val);
        else outw(port, (u16)val);
        puts_serial("thinvm-test-guest: still running after the debug-exit write\n");
    }
    puts_serial("thinvm-test-guest: requesting reset\n");
    request_reset();
}
