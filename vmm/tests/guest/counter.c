/* thinvm's tiny counting guest, for snapshot tests: a periodic LAPIC timer interrupt drives a
   counter; every `every=` ticks (default 20) it prints "COUNT n mem m" where m is a checksum
   over a 1 MiB buffer the guest rewrites as it counts (so a restored clone proves its memory
   and registers came back). It stops at `limit=` lines (default 1000000): with `exitval=V`
   by writing V to the debug-exit port 0x501, else by a reset. */
#include "guest.h"

static struct idt_gate idt[256] __attribute__((aligned(16)));
static volatile u64 ticks;
static u8 area[1 << 20] __attribute__((aligned(4096)));

__attribute__((interrupt)) static void timer_isr(struct interrupt_frame *f) {
    (void)f;
    ticks++;
    mmio_write32(LAPIC + 0xb0, 0); /* EOI */
}

void guest_main(const u8 *boot_params) {
    const char *cmdline = boot_cmdline(boot_params);
    u64 every = param_u64(cmdline, "every=", 20);
    u64 limit = param_u64(cmdline, "limit=", 1000000);
    u64 exitval = param_u64(cmdline, "exitval=", 1000);
    puts_serial("thinvm-counter-guest: start\n");
    idt_set_gate(idt, 0x40, timer_isr);
    idt_load(idt, 256);
    lapic_timer_start(0x40, 400000, 1); /* periodic */
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
