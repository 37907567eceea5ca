#!/bin/bash
# Wake-up A/B driver (issue 15; bench/README.md "Actor wake-ups and the leg send path").
# Starts LEGS nbdkit memory legs and one `enbd mirror` (--receive stream, --metadata none) pinned
# with `taskset -c CPUS`, runs fio 4 KiB WORKLOAD (randwrite|randread) QD32 for 0.5 s untimed,
# then RUNTIME s measured, and prints per request: IOPS, voluntary/involuntary context switches
# (summed over /proc/PID/task/*/status), CPU us (/proc/PID/stat), the mirror's wake-up counters
# (its "wake-ups since start" log line) and, with PERF=1, syscalls (perf stat -p over the run).
# usage: bench/wake-ab.sh LEGS workers|inline CPUS [RUNTIME] [WORKLOAD]
# env: MAIN (enbd entry, default this tree's dist), EXTRA (more mirror flags), ENBD_SPIN_US,
#      NODEARGS (e.g. "--cpu-prof --cpu-prof-dir=DIR"), PERF=1. Scratch files under a mktemp dir.
LEGS=$1; PL=$2; CPUS=$3; RT=${4:-3}; WL=${5:-randwrite}
MAIN=${MAIN:-$(cd "$(dirname "$0")/.." && pwd)/dist/src/cli/main.js}
D=$(mktemp -d /tmp/enbd-wake-ab.XXXXXX)
PIDS=()
LEGARGS=()
for i in $(seq 0 $((LEGS-1))); do
  nbdkit -f --unix $D/leg$i.sock memory 256M >/dev/null 2>&1 & PIDS+=($!)
  LEGARGS+=(--leg "nbd+unix:///?socket=$D/leg$i.sock")
done
for i in $(seq 0 $((LEGS-1))); do for t in $(seq 50); do [ -S $D/leg$i.sock ] && break; sleep 0.1; done; done
taskset -c $CPUS node $NODEARGS $MAIN mirror "${LEGARGS[@]}" --socket $D/m.sock --metadata none --log-level info --placement $PL --receive stream $EXTRA >/dev/null 2>$D/err & MP=$!
for t in $(seq 100); do [ -S $D/m.sock ] && break; sleep 0.1; done
ctx() { local s=0; for f in /proc/$MP/task/*/status; do v=$(awk '/^voluntary_ctxt_switches/{print $2}' $f 2>/dev/null); s=$((s+${v:-0})); done; echo $s; }
nv() { local s=0; for f in /proc/$MP/task/*/status; do v=$(awk '/^nonvoluntary_ctxt_switches/{print $2}' $f 2>/dev/null); s=$((s+${v:-0})); done; echo $s; }
cpu() { awk '{print $14+$15}' /proc/$MP/stat; }
fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$D/m.sock" --rw=$WL --bs=4k --iodepth=32 --size=256M --numjobs=1 --time_based --runtime=500ms --norandommap --randrepeat=0 >/dev/null 2>&1
c0=$(ctx); n0=$(nv); u0=$(cpu)
if [ -n "$PERF" ]; then perf stat -x, -o $D/perf.txt -e raw_syscalls:sys_enter,syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_read,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_futex,syscalls:sys_enter_sendmsg,syscalls:sys_enter_recvmsg -p $MP & PP=$!; fi
fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$D/m.sock" --rw=$WL --bs=4k --iodepth=32 --size=256M --numjobs=1 --time_based --runtime=${RT}s --norandommap --randrepeat=0 --output-format=json --output=$D/fio.json >/dev/null 2>&1
c1=$(ctx); n1=$(nv); u1=$(cpu)
if [ -n "$PERF" ]; then kill -INT $PP; wait $PP; fi
python3 - "$D/fio.json" $c0 $c1 $n0 $n1 $u0 $u1 "$LEGS $PL cpus=$CPUS $WL ${EXTRA}" <<'PY'
import json,sys
j=json.load(open(sys.argv[1]))['jobs'][0]
side = j['write'] if j['write']['total_ios']>0 else j['read']
ios=side['total_ios']; iops=side['iops']
c0,c1,n0,n1,u0,u1=map(int,sys.argv[2:8])
print(f"{sys.argv[8]:45s} iops={iops/1000:6.1f}k  vcsw/req={(c1-c0)/ios:.3f} ivcsw/req={(n1-n0)/ios:.3f} cpu_us/req={(u1-u0)*10000/ios:.1f}")
PY
if [ -n "$PERF" ]; then python3 - $D/perf.txt $D/fio.json <<'PY'
import json,sys
j=json.load(open(sys.argv[2]))['jobs'][0]
side = j['write'] if j['write']['total_ios']>0 else j['read']
ios=side['total_ios']
out=[]
for line in open(sys.argv[1]):
    p=line.strip().split(',')
    if len(p)>3 and p[0].replace('.','').isdigit():
        name=p[2].replace('syscalls:sys_enter_','').replace('raw_syscalls:sys_enter','all')
        out.append(f"{name}={int(float(p[0]))/ios:.2f}")
print('   syscalls/req (fio run incl. ramp-free window):',' '.join(out))
PY
fi
kill $MP; wait $MP 2>/dev/null
python3 - $D/err <<'PY'
import json,sys
for line in open(sys.argv[1]):
    if 'wake-ups since start' in line:
        j=json.loads(line); w=j['wake']; r=max(1,w['requests'])
        print(f"   wake/req: dispatchNotify={w['dispatchNotifies']/r:.3f} actorSleep={w['actorSleeps']/r:.3f} actorSpinHit={w['actorSpinHits']/r:.3f} doorbellNotify={w['doorbellNotifies']/r:.3f} masterSleep={w['masterSleeps']/r:.3f} masterSpinHit={w['masterSpinHits']/r:.3f} spin={j['spin']}")
PY
kill ${PIDS[@]}; wait 2>/dev/null
rm -rf $D
