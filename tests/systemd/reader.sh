#!/bin/sh
# /bin/reader NAME FIRST, the workload of the containers of `make
# test-systemd`: read the image's data files one after the other from line
# FIRST of /data/SUMS on, each checked against its sha256, forever. One line
# per read goes to /out/NAME.log: "ok N" or "FAIL N PATH". The test compares
# the counts before and after each restart or kill of a service.
name=$1
i=${2:-0}
log=/out/$name.log
n=$(wc -l </data/SUMS)
ok=0
bad=0
while :; do
    line=$(sed -n "$((i % n + 1))p" /data/SUMS)
    set -- $line
    if [ -n "$1" ] && echo "$line" | sha256sum -c -s 2>/dev/null; then
        ok=$((ok + 1))
        echo "ok $ok" >>"$log"
    else
        bad=$((bad + 1))
        echo "FAIL $bad $2" >>"$log"
    fi
    i=$((i + 1))
    sleep 0.1
done
