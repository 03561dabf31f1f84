/* thinvm's tiny counting guest, for snapshot tests: a periodic LAPIC timer interrupt drives a
   counter; every `every=` ticks (default 20) it prints "COUNT n mem m" where m is a checksum
   over a 1 MiB buffer the guest rewrites as it counts (so a restored clone proves its memory
   and registers came back). It stops at `limit=` lines (default 1000000): with `exitval=V`
   by writing V to the debug-exit port 0x501, else by a reset. */
#include "guest.h"

struct idt_gate {
    u16 off_lo, sel;
    u8 ist, attr;
    u16 off_mid;
    u32 off_hi, zero;
} __attribute__((packed));

struct idt_ptr { u16 limit; u64 base; } __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));
static volatile u64 ticks;
static u8 area[1 << 20] __attribute__((aligned(4096)));

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
    u64 every = param_u64(cmdline, "every=", 20);
    u64 limit = param_u64(cmdline, "limit=", 1000000);
    u64 exitval = param_u64(cmdline, "exitval=", 1000);
    puts_serial("thinvm-counter-guest: start\n");
    set_gate(0x40, timer_isr);
    struct idt_ptr p = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(p));
    mmio_write32(LAPIC + 0xf0, 0x1ff);
    mmio_write32(LAPIC + 0x3e0, 0xb);
    mmio_write32(LAPIC + 0x320, 0x40 | (1 << 17)); /* periodic */
    mmio_write32(LAPIC + 0x380, 400000);
    u64 seen = 0, count = 0;
    u32 sum = 0;
    while (count < limit) {
        __asm__ volatile("sti; hlt; cli");
        if (ticks - seen < every) continue;
        seen = ticks;
        count++;
        /* Rewrite one 4 KiB page of the area with the count; keep a running checksum. */
        u8 *page = area + (count % 256) * 4096;
        for (u32 i = 0; i < 4096; i++) page[i] = (u8)(count + i);
        sum = 0;
        for (u32 i = 0; i < sizeof(area); i += 64) sum = sum * 31 + area[i];
        puts_serial("COUNT ");
        put_dec(count);
        puts_serial(" mem ");
        put_dec(sum);
        puts_serial("\n");
    }
    if (exitval < 256) {
        puts_serial("COUNTER-EXIT\n");
        outb(0x501, (u8)exitval);
    }
    request_reset();
}
