import time, numpy as np, tensorflow as tf
def pads(H, k, s):
    out = -(-H // s); tot = max((out - 1) * s + k - H, 0); return out, tot // 2, tot - tot // 2
def filt_grad_slices(x, dy, k, s):
    N, H, W, C = x.shape
    oh, pt, pb = pads(H, k, s); ow, pl, pr = pads(W, k, s)
    xp = tf.pad(x, [[0, 0], [pt, pb], [pl, pr], [0, 0]])
    rows = []
    for i in range(k):
        for j in range(k):
            xs = xp[:, i:i + (oh - 1) * s + 1:s, j:j + (ow - 1) * s + 1:s, :]
            rows.append(tf.reduce_sum(xs * dy, axis=[0, 1, 2]))
    return tf.reshape(tf.stack(rows), [k, k, C, 1])
def med(f, n=7):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return float(np.median(ts))
shapes = [(40, 144, 5, 2), (20, 240, 5, 1), (20, 240, 3, 2), (10, 480, 3, 1), (10, 480, 5, 1), (10, 672, 5, 1), (10, 672, 5, 2), (5, 1152, 5, 1), (5, 1152, 3, 1)]
tot_n = tot_c = 0
for H, C, k, s in shapes:
    x = tf.random.normal([128, H, H, C]); oh = -(-H // s)
    dy = tf.random.normal([128, oh, oh, C])
    nat = tf.function(lambda x, dy: tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(input=x, filter_sizes=[k, k, C, 1], out_backprop=dy, strides=[1, s, s, 1], padding="SAME"))
    cus = tf.function(lambda x, dy: filt_grad_slices(x, dy, k, s))
    a, b = nat(x, dy).numpy(), cus(x, dy).numpy()
    err = np.abs(a - b).max() / np.abs(a).max()
    tn, tc = med(lambda: nat(x, dy).numpy()), med(lambda: cus(x, dy).numpy())
    tot_n += tn; tot_c += tc
    print(f"H{H} C{C} k{k} s{s}: native {tn*1000:.1f} ms, slices {tc*1000:.1f} ms, rel err {err:.1e}", flush=True)
print(f"total native {tot_n*1000:.0f} ms, slices {tot_c*1000:.0f} ms")
