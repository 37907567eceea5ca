#!/bin/bash
# Per-READ cost driver (issue 15, 4 KiB randread QD32; bench/README.md "Session 7: where a 4 KiB
# READ's time goes"). Starts 2 nbdkit memory legs (filled by a 1 MiB write pass so reads hit
# pages) and one server under test:
#   enbd  - `enbd mirror` over both legs with the default flags (+ EXTRA), --metadata none
#   proxy - nbdkit's nbd plugin in front of leg 0 (the C pass-through peer)
# runs fio 4 KiB randread QD32 for 0.5 s untimed, then RUNTIME s measured, and prints per READ:
# IOPS, CPU us per thread group (/proc/PID/task/*/stat, grouped by thread name), voluntary and
# involuntary context switches, and (PERF=1) syscalls by name (perf stat over every
# syscalls:sys_enter_* tracepoint, the ones >= 0.02 per READ).
# usage: bench/read-path.sh enbd|proxy [RUNTIME]
# env: MAIN (enbd entry, default this tree's dist), EXTRA (more mirror flags), NODEARGS, PERF=1,
#      BS (default 4k), RW (default randread). Scratch files under a mktemp dir, removed at exit.
KIND=$1; RT=${2:-3}; BS=${BS:-4k}; RW=${RW:-randread}
MAIN=${MAIN:-$(cd "$(dirname "$0")/.." && pwd)/dist/src/cli/main.js}
D=$(mktemp -d /tmp/enbd-read-path.XXXXXX)
PIDS=()
for i in 0 1; do nbdkit -f --unix $D/leg$i.sock memory 256M >/dev/null 2>&1 & PIDS+=($!); done
for i in 0 1; do for t in $(seq 50); do [ -S $D/leg$i.sock ] && break; sleep 0.1; done; done
if [ "$KIND" = proxy ]; then
  nbdkit -f --unix $D/m.sock nbd socket=$D/leg0.sock >/dev/null 2>$D/err & MP=$!
else
  node $NODEARGS $MAIN mirror --leg "nbd+unix:///?socket=$D/leg0.sock" --leg "nbd+unix:///?socket=$D/leg1.sock" \
    --socket $D/m.sock --metadata none --log-level info $EXTRA >/dev/null 2>$D/err & MP=$!
fi
for t in $(seq 100); do [ -S $D/m.sock ] && break; sleep 0.1; done
U="nbd+unix:///?socket=$D/m.sock"
fio --name=fill --ioengine=nbd --uri="$U" --rw=write --bs=1M --iodepth=8 --size=256M >/dev/null 2>&1
fio --name=w --ioengine=nbd --uri="$U" --rw=$RW --bs=$BS --iodepth=32 --size=256M --time_based --runtime=500ms --norandommap --randrepeat=0 >/dev/null 2>&1
# one line per live thread: label (main = the thread group leader, else comm + tid), CPU ticks, cs
snap() { echo "process $(awk '{print $14+$15}' /proc/$MP/stat) $(awk '{print $14, $15}' /proc/$MP/stat)"
  for f in /proc/$MP/task/*; do
    t=${f##*/}; n=$(cat $f/comm 2>/dev/null | tr ' ' _); [ "$t" = "$MP" ] && n=main
    l="$(awk '{print $14+$15}' $f/stat 2>/dev/null) $(awk '/^voluntary_ctxt/{v=$2}/^nonvoluntary_ctxt/{n=$2}END{print v, n}' $f/status 2>/dev/null)"
    [ -n "$n" ] && [ $(echo $l | wc -w) = 3 ] && echo "$n:$t $l"   # threads that exit mid-snapshot are left out
  done; }
# The window: enbd's threads live for the whole run, so it spans the whole measured fio run
# (READs = fio's total); nbdkit's pass-through makes its threads per connection (their CPU stays
# in the process total, their context switches leave with them), so for it the window opens
# once the connection's threads exist and closes 0.3 s before fio's end (READs = fio's mean
# rate x window).
stopw() { if [ -n "$PERF" ]; then kill -INT $PP; else kill $PP; fi; wait $PP 2>/dev/null; }
threads() { ls /proc/$MP/task | wc -l; }
N0=$(threads)
PERFCMD=(sleep 86400); [ -n "$PERF" ] && PERFCMD=(perf stat -x, -o $D/perf.txt -e 'syscalls:sys_enter_*' -p $MP)
FIO=(fio --name=w --ioengine=nbd --uri="$U" --rw=$RW --bs=$BS --iodepth=32 --size=256M --time_based --runtime=${RT}s --norandommap --randrepeat=0 --output-format=json --output=$D/fio.json)
if [ "$KIND" = proxy ]; then
  "${FIO[@]}" >/dev/null 2>&1 & FP=$!
  for t in $(seq 500); do [ "$(threads)" -gt "$N0" ] && break; sleep 0.01; done
  T0=$(date +%s.%N); snap > $D/s0; "${PERFCMD[@]}" & PP=$!
  sleep $(python3 -c "print(max(0.3, $RT - 0.3))")
  snap > $D/s1; T1=$(date +%s.%N); stopw; wait $FP
  echo "$T0 $T1 rate" > $D/window
else
  snap > $D/s0; "${PERFCMD[@]}" & PP=$!; sleep 0.2
  "${FIO[@]}" >/dev/null 2>&1
  snap > $D/s1; stopw
  echo "0 0 total" > $D/window
fi
python3 - "$D" "$KIND ${EXTRA} $(dirname $(dirname $(dirname $(dirname $MAIN))))" <<'PY'
import json,sys,collections
d=sys.argv[1]
j=json.load(open(d+'/fio.json'))['jobs'][0]
side=j['read'] if j['read']['total_ios']>0 else j['write']
w=open(d+'/window').read().split()
ios=side['total_ios'] if w[2]=='total' else side['iops']*(float(w[1])-float(w[0]))
def load(p):
    r={}
    for l in open(p):
        name,cpu,v,n=l.split(); r[name]=(int(cpu),int(v),int(n))
    return r
a,b=load(d+'/s0'),load(d+'/s1')
proc=b['process'][0]-a['process'][0]
user=b['process'][1]-a['process'][1]; system=b['process'][2]-a['process'][2]
rows=[]; tot=[0,0]
for k in b:
    if k=='process': continue
    x=a.get(k,(0,0,0)); y=b[k]; v=[y[t]-x[t] for t in range(3)]
    tot[0]+=v[1]; tot[1]+=v[2]
    if v[0] or v[1]>ios*0.01: rows.append((k,v))
print(f"{sys.argv[2]:40s} iops={side['iops']/1000:6.1f}k  cpu_us/req={proc*10000/ios:6.1f} vcsw/req={tot[0]/ios:.3f} ivcsw/req={tot[1]/ios:.3f} (live threads); user/sys us/req {user*10000/ios:.1f}/{system*10000/ios:.1f}")
for k,v in sorted(rows, key=lambda kv:-kv[1][0]):
    print(f"   {k:22s} cpu_us/req={v[0]*10000/ios:6.1f} vcsw/req={v[1]/ios:.3f} ivcsw/req={v[2]/ios:.3f}")
import os
if os.path.exists(d+'/perf.txt'):
    out=[]; total=0
    for line in open(d+'/perf.txt'):
        p=line.strip().split(',')
        if len(p)>3 and p[0].replace('.','').isdigit():
            c=int(float(p[0])); total+=c
            if c/ios>=0.02: out.append((c/ios,p[2].replace('syscalls:sys_enter_','')))
    print(f"   syscalls/req all={total/ios:.2f}: "+' '.join(f"{n}={v:.2f}" for v,n in sorted(out,reverse=True)))
PY
kill $MP; wait $MP 2>/dev/null
kill ${PIDS[@]}; wait 2>/dev/null
rm -rf $D
