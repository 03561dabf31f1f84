/* Entry: thinvm enters in 64-bit mode with rsi = boot_params. */
    .section .text.start, "ax"
    .globl _start
_start:
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi
    call guest_main
1:  cli
    hlt
    jmp 1b
