/* Freestanding helpers for thinvm's tiny test guests. */
#ifndef THINVM_GUEST_H
#define THINVM_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write16(u64 addr, u16 v) { *(volatile u16 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }

#define COM1 0x3f8

static void putc_serial(char c) {
    while (!(inb(COM1 + 5) & 0x20)) { }
    outb(COM1, (u8)c);
}

static void puts_serial(const char *s) {
    while (*s) {
        if (*s == '\n') putc_serial('\r');
        putc_serial(*s++);
    }
}

static void put_hex(u64 v) {
    const char *d = "0123456789abcdef";
    char buf[19];
    buf[0] = '0'; buf[1] = 'x';
    for (int i = 0; i < 16; i++) buf[2 + i] = d[(v >> (60 - 4 * i)) & 0xf];
    buf[18] = 0;
    puts_serial(buf);
}

static void put_dec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v && i > 0);
    puts_serial(&buf[i]);
}

/* The kernel command line from the boot_params thinvm passes in rsi. */
static const char *boot_cmdline(const u8 *boot_params) {
    u32 ptr = *(const u32 *)(boot_params + 0x228);
    return (const char *)(u64)ptr;
}

static int has_word(const char *s, const char *w) {
    for (; *s; s++) {
        const char *a = s, *b = w;
        while (*b && *a == *b) { a++; b++; }
        if (!*b && (*a == 0 || *a == ' ')) return 1;
    }
    return 0;
}

/* The number after `key` (e.g. "exitval=") on the command line: decimal or 0x hex; `dflt` when
   absent. */
static u64 param_u64(const char *s, const char *key, u64 dflt) {
    for (; *s; s++) {
        const char *a = s, *b = key;
        while (*b && *a == *b) { a++; b++; }
        if (*b) continue;
        u64 v = 0;
        if (a[0] == '0' && a[1] == 'x') {
            for (a += 2; *a && *a != ' '; a++)
                v = v * 16 + (u64)(*a <= '9' ? *a - '0' : (*a | 0x20) - 'a' + 10);
        } else {
            for (; *a >= '0' && *a <= '9'; a++) v = v * 10 + (u64)(*a - '0');
        }
        return v;
    }
    return dflt;
}

static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static void request_reset(void) {
    outb(0x64, 0xfe);
    for (;;) __asm__ volatile("hlt");
}

static void *memset_(void *p, int c, u64 n) {
    u8 *d = p;
    while (n--) *d++ = (u8)c;
    return p;
}

/* Interrupts: a 64-bit IDT gate, loading a table, and the LAPIC timer (the guests that take
   timer interrupts keep their own table and handler). */
struct idt_gate {
    u16 off_lo, sel;
    u8 ist, attr;
    u16 off_mid;
    u32 off_hi, zero;
} __attribute__((packed));

struct idt_ptr { u16 limit; u64 base; } __attribute__((packed));

struct interrupt_frame;

#define LAPIC 0xfee00000UL

static inline void idt_set_gate(struct idt_gate *idt, int vec, void (*h)(struct interrupt_frame *)) {
    u64 a = (u64)h;
    idt[vec].off_lo = a & 0xffff;
    idt[vec].sel = 0x08;
    idt[vec].ist = 0;
    idt[vec].attr = 0x8e;
    idt[vec].off_mid = (a >> 16) & 0xffff;
    idt[vec].off_hi = a >> 32;
    idt[vec].zero = 0;
}

static inline void idt_load(struct idt_gate *idt, u16 entries) {
    struct idt_ptr p = { (u16)(entries * sizeof(struct idt_gate) - 1), (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(p));
}

/* Software-enables the LAPIC and starts its timer on `vector` (divide by 1), one-shot or
   periodic, counting down from `count`. */
static inline void lapic_timer_start(u32 vector, u32 count, int periodic) {
    mmio_write32(LAPIC + 0xf0, 0x1ff);
    mmio_write32(LAPIC + 0x3e0, 0xb);
    mmio_write32(LAPIC + 0x320, vector | (periodic ? (1u << 17) : 0));
    mmio_write32(LAPIC + 0x380, count);
}

#endif
