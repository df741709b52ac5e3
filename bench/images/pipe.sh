# A shell script that execs many small programs in pipelines (find, sort,
# xargs, sha256sum, awk, uniq, wc, file, tar, xz) over many small files:
# /usr/share/doc's copyright files, the head of every program in /usr/bin,
# all of /etc. tar archives in readdir order, which differs between a full
# pull (ext4) and a lazy mount (sorted): the xz size differs with it.
image_pipe() {
    desc='Debian bookworm minbase + file + xz-utils, config Cmd ["bash"]'
    cmd='["bash"]'
    layers=(
        "apt-get install -y --no-install-recommends file xz-utils"
    )
    same_layers=
    profile=pipe
}
workload_pipe() {
    image=pipe bound=1 expect='^pipe ok [0-9]+ [a-z/-]+ [0-9]+$'
    argv=(sh -c 'n=$(find /usr/share/doc -name copyright | sort | xargs sha256sum | awk "{print \$1}" | sort -u | wc -l)
k=$(file -b --mime-type /usr/bin/* | sort | uniq -c | sort -rn | head -1 | awk "{print \$2}")
z=$(tar -cf - /etc 2>/dev/null | xz -1 -T1 | wc -c)
echo "pipe ok $n $k $z"')
    what="a sh script of pipelines: sha256sum of /usr/share/doc's copyright files, \`file\` on every program in /usr/bin, \`tar /etc | xz\`"
}
