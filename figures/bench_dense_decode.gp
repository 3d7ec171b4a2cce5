# The CPU benchmark of chapter 04: decode time per token against context for MHA, GQA and MQA at equal width,
# beside the time the K+V bytes would take at the machine's measured streaming bandwidth.
# Data: benchmarks/dense_decode.csv (header lines "# machine: ..." and "# streaming_read_gbps: ...").
load 'style.gp'

data = datadir.'/benchmarks/dense_decode.csv'
machine = system("sed -n 's/^# machine: //p' '".data."'")
stream = real(system("sed -n 's/^# streaming_read_gbps: //p' '".data."'"))
set datafile separator ','
set title sprintf("CPU decode, one token: attention time against context\n{/*0.8 %s, one thread}", machine)
set xlabel 'context length (tokens)'
set ylabel 'time per decode step (ms)'
set logscale xy 2
set format x '%.0f'
set xtics ('1K' 1024, '2K' 2048, '4K' 4096, '8K' 8192, '16K' 16384, '32K' 32768)
set format y '%g'
set key bottom right font ',11'
set offsets graph 0.05, graph 0.05, 0, 0
decode(variant, col) = (strcol(1) eq 'decode' && strcol(2) eq variant) ? column(col) : NaN
floor_ms(variant) = (strcol(1) eq 'decode' && strcol(2) eq variant) ? $6 / (stream * 1e9) * 1e3 : NaN
plot data using (decode('MHA', 4)) : (decode('MHA', 5) * 1e3) with linespoints linetype 2 title 'MHA', \
     data using (decode('GQA', 4)) : (decode('GQA', 5) * 1e3) with linespoints linetype 1 title 'GQA', \
     data using (decode('MQA', 4)) : (decode('MQA', 5) * 1e3) with linespoints linetype 3 title 'MQA', \
     data using (decode('MHA', 4)) : (floor_ms('MHA')) with lines linetype 2 dashtype 2 linewidth 1.2 title 'MHA bytes at stream bandwidth', \
     data using (decode('GQA', 4)) : (floor_ms('GQA')) with lines linetype 1 dashtype 2 linewidth 1.2 title 'GQA bytes at stream bandwidth', \
     data using (decode('MQA', 4)) : (floor_ms('MQA')) with lines linetype 3 dashtype 2 linewidth 1.2 title 'MQA bytes at stream bandwidth'
