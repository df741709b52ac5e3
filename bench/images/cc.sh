# A C toolchain: compile, link and run a small C file. The exec chain
# gcc -> cc1 -> as -> collect2 -> ld (large programs, tens of MB) is decided
# by gcc at run time; the compiler and the C library's headers and start
# files are in different layers.
image_cc() {
    desc='Debian bookworm minbase + gcc + libc6-dev + a C source file, config Cmd ["bash"]'
    cmd='["bash"]'
    layers=(
        "apt-get install -y --no-install-recommends gcc"
        "apt-get install -y --no-install-recommends libc6-dev"
        "host:cc_source"
    )
    same_layers=
    profile=cc
}
cc_source() { # layer-dir
    mkdir -p "$1/src"
    cat >"$1/src/hello.c" <<'C'
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void)
{
    char buf[64];
    double sum = 0;
    for (int i = 1; i <= 1000; i++)
        sum += sqrt((double)i);
    snprintf(buf, sizeof buf, "%.3f", sum);
    printf("cc ok %s %zu\n", buf, strlen(buf));
    return EXIT_SUCCESS;
}
C
}
workload_cc() {
    image=cc bound=1 expect='^cc ok [0-9.]+ [0-9]+$'
    argv=(sh -c 'gcc -O2 -o /tmp/hello /src/hello.c -lm && /tmp/hello')
    what="\`gcc -O2 -o /tmp/hello /src/hello.c -lm && /tmp/hello\` (gcc -> cc1 -> as -> collect2 -> ld, then the program)"
}
