import sys, collections, glob
from tensorflow.tsl.profiler.protobuf import xplane_pb2
sp = xplane_pb2.XSpace()
sp.ParseFromString(open(glob.glob("/tmp/prof/logdir/plugins/profile/*/*.xplane.pb")[-1], "rb").read())
for plane in sp.planes:
    md = plane.event_metadata
    agg = collections.Counter(); cnt = collections.Counter()
    for line in plane.lines:
        for ev in line.events:
            name = md[ev.metadata_id].name
            # group by op type: after ':' in "name:Type"
            typ = name.split(":")[-1] if ":" in name else name
            agg[(line.name, typ)] += ev.duration_ps / 1e12
            cnt[(line.name, typ)] += 1
    if not agg: continue
    print("==", plane.name, [l.name for l in plane.lines][:10])
    for (ln, typ), s in agg.most_common(40):
        print(f"{s:8.3f}s {cnt[(ln,typ)]:6d}  {ln[:20]:20s} {typ[:80]}")
