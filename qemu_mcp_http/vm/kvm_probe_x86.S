/* KVM probe boot sector for x86_64 hosts; the bytes are embedded in accel.py.
 * Build: as --32 -o b.o kvm_probe_x86.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o b.img b.o
 * Real mode -> paging + long mode -> a loop -> marker to debugcon 0x402 -> isa-debug-exit (status 33). */
.code16
.globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    /* zero 3 pages of page tables at 0x1000 */
    movw $0x1000, %di
    xorl %eax, %eax
    movw $3072, %cx
    rep stosl
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    movl $0x0083, 0x3000
    lgdtl gdt_desc
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0x1000, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl $0x08, $long_mode
.code64
long_mode:
    /* some work in long mode: sum 1..1000000 */
    xorq %rax, %rax
    movq $1000000, %rcx
1:  addq %rcx, %rax
    loop 1b
    movw $0x402, %dx
    leaq msg(%rip), %rsi
    movq $msg_end - msg, %rcx
    rep outsb
    movw $0xf4, %dx
    movb $0x10, %al
    outb %al, %dx
2:  hlt
    jmp 2b
msg: .ascii "\nQMCP-KVM-PROBE-OK\n"
msg_end:
.p2align 3
gdt:
    .quad 0
    .quad 0x00209A0000000000
    .quad 0x0000920000000000
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
.org 510
.byte 0x55, 0xaa
