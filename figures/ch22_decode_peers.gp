# Chapter 22: the project's best decode kernel against the peers of the same run, per benchmark shape, as a
# percentage of the read-only bandwidth (kernels/results/decode_h100.csv, read from figures/).
load 'style.gp'
if (!exists("csv")) csv = '../kernels/results/decode_h100.csv'
gpu = system("sed -n 's/^# gpu: //p' '".csv."'")
set datafile separator ','
shapes = "llama3-8b qwen3-30b-a3b qwen3-235b-a22b llama3-8b-b1-128k llama3-8b-b8-32k mha-b64-8k"
index_of(s) = s eq word(shapes, 1) ? 0 : s eq word(shapes, 2) ? 1 : s eq word(shapes, 3) ? 2 : \
              s eq word(shapes, 4) ? 3 : s eq word(shapes, 5) ? 4 : s eq word(shapes, 6) ? 5 : NaN
impls = "best cudnn_sdpa sdpa_flash flex_compiled flashinfer_decode_tc flashinfer_decode eager_bmm"
titles = "best cuDNN SDPA-flash Flex-compiled FlashInfer-TC FlashInfer eager-bmm"
n = words(impls)
width = 0.8 / n
pct(v) = strcol(8) eq v && strcol(14) ne '' ? column(14) : NaN
# A peer that failed on a shape has no bar: a rotated "failed" stands in its place, so no gap reads as zero.
failed(v) = strcol(8) eq v && strcol(18) ne 'ok' ? 2 : NaN
set title sprintf("Decode attention against the peers: %% of the read ceiling\n{/*0.8 %s, same run}", gpu)
set ylabel '% of read-only bandwidth'
set yrange [0:105]
set xrange [-0.6:5.6]
set xtics ('llama3-8b' 0, 'qwen3-30b' 1, 'qwen3-235b' 2, 'b1 128k' 3, 'b8 32k' 4, 'MHA b64 8k' 5) font ',11'
set style fill solid 0.85 noborder
set boxwidth width
set key outside bottom center horizontal noenhanced font ',11' maxrows 1 width -1
plot for [i = 1:n] csv using (index_of(strcol(1)) - 0.4 + (i - 0.5) * width) : (pct(word(impls, i))) \
     with boxes linetype i title word(titles, i), \
     for [i = 1:n] csv using (index_of(strcol(1)) - 0.4 + (i - 0.5) * width) : (failed(word(impls, i))) : \
     ("failed") with labels rotate by 90 left font ',9' textcolor linetype i notitle
