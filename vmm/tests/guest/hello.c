/* thinvm's tiny test guest: prints on the serial port, takes a LAPIC timer interrupt, then
   ends the VM the way the kernel command line asks: `mode=reset` (i8042 reset, the default),
   `mode=halt` (cli; hlt on every CPU, what Linux does for halt without ACPI),
   `mode=triple` (triple fault), `mode=spin` (idle until stopped), `mode=busy` (runs, never
   halting, for `busyticks=` (default 200) ticks of a 10 ms periodic timer, then halts as
   `mode=halt`), `mode=cx16` (a cmpxchg16b right after an I/O exit, which
   software-nested KVM hosts cannot emulate), `mode=debug-exit` (writes `exitval=` with an
   I/O write of `exitwidth=` bytes (1, 2, 4) to port `exitport=` (default 0x501), then, if the
   VM is still running, says so and resets). */
#include "guest.h"

static struct idt_gate idt[256] __attribute__((aligned(16)));
static volatile int ticks;

__attribute__((interrupt)) static void timer_isr(struct interrupt_frame *f) {
    (void)f;
    ticks++;
    mmio_write32(LAPIC + 0xb0, 0); /* EOI */
}

void guest_main(const u8 *boot_params) {
    const char *cmdline = boot_cmdline(boot_params);
    puts_serial("thinvm-test-guest: hello\n");
    puts_serial("cmdline: ");
    puts_serial(cmdline);
    puts_serial("\n");
    {
        u32 a = 1, b, c = 0, d;
        __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
        puts_serial((c >> 24) & 1 ? "thinvm-test-guest: tsc-deadline timer\n"
                                  : "thinvm-test-guest: no tsc-deadline timer\n");
    }

    idt_set_gate(idt, 0x40, timer_isr);
    idt_load(idt, 256);
    lapic_timer_start(0x40, 200000, 0); /* one-shot */
    /* "sti; hlt" back to back: sti's interrupt shadow guarantees the interrupt is taken
       only once hlt is waiting, so it cannot slip in between the check and the hlt. */
    while (!ticks) __asm__ volatile("sti; hlt; cli");
    puts_serial("thinvm-test-guest: timer interrupt received\n");

    if (has_word(cmdline, "mode=spin")) {
        puts_serial("thinvm-test-guest: idling until stopped\n");
        __asm__ volatile("sti");
        for (;;) __asm__ volatile("hlt");
    }
    if (has_word(cmdline, "mode=busy")) {
        int until = ticks + (int)param_u64(cmdline, "busyticks=", 200);
        puts_serial("thinvm-test-guest: busy\n");
        lapic_timer_start(0x40, 10000000, 1); /* 10 ms at KVM's 1 GHz APIC bus, periodic */
        __asm__ volatile("sti");
        while (ticks < until) __asm__ volatile("pause");
        puts_serial("thinvm-test-guest: halting\n");
        for (;;) __asm__ volatile("cli; hlt");
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
