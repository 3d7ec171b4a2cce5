# Chapter 07: values per token and layer in DeepSeek-V3: what MLA caches and what the naive path rebuilds
# from it for the 128 heads. Data: 07_multi_head_latent_attention/cached_vs_rebuilt.dat, "kind part values".
load 'style.gp'

data = datadir.'/07_multi_head_latent_attention/cached_vs_rebuilt.dat'
set terminal svg enhanced size 720, 260 font 'sans-serif,12' background rgb 'white'
set output outfile
set title 'Per token and layer (DeepSeek-V3): cached vs rebuilt for 128 heads'
set xlabel 'values'
set yrange [-0.7 : 1.7]
set ytics ('cached' 1, 'rebuilt (naive)' 0)
set xrange [0 : 36000]
set grid noytics
set style fill solid 0.85 noborder
unset key
# rows: 0 c_KV, 1 k_pe (cached, stacked), 2 k_nope, 3 v (rebuilt, stacked)
plot data every ::0::0 using (($3) / 2) : (1) : ($3 / 2) : (0.3) with boxxyerror linecolor 1, \
     data every ::1::1 using (512 + $3 / 2) : (1) : ($3 / 2) : (0.3) with boxxyerror linecolor 5, \
     data every ::2::2 using ($3 / 2) : (0) : ($3 / 2) : (0.3) with boxxyerror linecolor 2, \
     data every ::3::3 using (16384 + $3 / 2) : (0) : ($3 / 2) : (0.3) with boxxyerror linecolor 4, \
     data every ::0::0 using (1200) : (1.45) : ('c_KV 512 + k_pe 64 = 576 values, shared by all heads') with labels left noenhanced font ',11', \
     data every ::2::2 using (8192) : (0) : ('k_nope 128 x 128') with labels noenhanced textcolor rgb 'white' font ',11', \
     data every ::3::3 using (24576) : (0) : ('v 128 x 128') with labels noenhanced textcolor rgb 'white' font ',11'
