# Chapter 05's CPU benchmark: decode latency per token against context for several batch sizes, and the
# prefill's time per token (time to first token / prompt length) for comparison.
# Data: kv_decode/kv_decode.csv (header line "# machine: ...").
load 'style.gp'

data = datadir.'/kv_decode/kv_decode.csv'
machine = system("sed -n 's/^# machine: //p' '".data."'")
set datafile separator ','
set title sprintf("CPU decode latency per generated token\n{/*0.8 %s, one thread}", machine)
set xlabel 'context length (tokens)'
set ylabel 'ms per token'
set logscale xy 2
set format x ''
do for [p = 7:14] { set xtics add (tokens(2**p) 2**p) }
set format y '%g'
set xrange [100 : 11000]
set key top left font ',11'
decode(b) = (strcol(1) eq 'decode' && column(3) == b) ? column(4) * 1e3 / b : NaN
prefill(c) = strcol(1) eq 'prefill' ? column(4) * 1e3 / column(2) : NaN
plot data using 2 : (decode(1)) with linespoints linetype 2 title 'decode, batch 1', \
     data using 2 : (decode(4)) with linespoints linetype 1 title 'decode, batch 4', \
     data using 2 : (decode(16)) with linespoints linetype 3 title 'decode, batch 16', \
     data using 2 : (prefill(0)) with linespoints linetype 4 dashtype 2 title 'prefill (TTFT / prompt length)'
