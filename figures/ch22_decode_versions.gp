# Chapter 22: every decode kernel version on every benchmark shape, as a percentage of the read-only bandwidth
# measured in the same run: the committed result file kernels/results/decode_h100.csv (read from figures/).
load 'style.gp'
if (!exists("csv")) csv = '../kernels/results/decode_h100.csv'
gpu = system("sed -n 's/^# gpu: //p' '".csv."'")
ceiling = real(system("awk -F, 'NR>1 && $15 != \"\" && $15 != \"read_ceiling_gbps\" {print $15; exit}' '".csv."'"))
set datafile separator ','
shapes = "llama3-8b qwen3-30b-a3b qwen3-235b-a22b llama3-8b-b1-128k llama3-8b-b8-32k mha-b64-8k"
index_of(s) = s eq word(shapes, 1) ? 0 : s eq word(shapes, 2) ? 1 : s eq word(shapes, 3) ? 2 : \
              s eq word(shapes, 4) ? 3 : s eq word(shapes, 5) ? 4 : s eq word(shapes, 6) ? 5 : NaN
versions = "v1_naive v2_gqa v3_split v4_mma v5_pipelined"
n = words(versions)
width = 0.8 / n
pct(v) = strcol(8) eq v && strcol(14) ne '' ? column(14) : NaN
set title sprintf("Decode kernels, bf16 KV cache: %% of the read ceiling\n{/*0.8 %s, read-only streaming %.0f GB/s}", gpu, ceiling)
set ylabel '% of read-only bandwidth'
set yrange [0:105]
set xrange [-0.6:5.6]
set xtics ('llama3-8b' 0, 'qwen3-30b' 1, 'qwen3-235b' 2, 'b1 128k' 3, 'b8 32k' 4, 'MHA b64 8k' 5) font ',11'
set style fill solid 0.85 noborder
set boxwidth width
set key outside bottom center horizontal noenhanced font ',11' maxrows 1 width -1
plot for [i = 1:n] csv using (index_of(strcol(1)) - 0.4 + (i - 0.5) * width) : (pct(word(versions, i))) \
     with boxes linetype i title word(versions, i)
